"""Turning a run's outputs into other datasets: frames decoded from tokens (`decode`),
LeRobot (`lerobot`) and Hugging Face `datasets` (`hf`)."""
