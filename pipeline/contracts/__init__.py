"""Contracts: the job spec, the plan, the output layout, storage and the rules that every
layer above shares."""
