"""Pipeline parallelism: pure schedules, one runner, stage partitioning."""
