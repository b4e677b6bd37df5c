"""The actor side: what runs inside a Ray actor or Serve replica."""
