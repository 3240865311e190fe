"""The worker role's async-task machinery, apart from the HTTP data plane it calls: the runner
that pops and runs jobs (`runner`, `jobs`), the task rows (`taskstore`), the sweeper that
re-queues what Redis lost and finishes batches (`sweeper`, `batches`), callbacks
(`callbacks`), and the role's entry point (`serve`)."""
