"""The transports that run jobs for the scheduler: threads of this process (local) or GPU workers over
taskiq + Redis (distributed, gpu_worker, and their wire records, blobs, heartbeats and event reader)."""
