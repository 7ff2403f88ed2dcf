"""Fine-tuning, framework-free: the options, the trainer and its run folder, schedule, monitoring, several processes, memory budget."""
