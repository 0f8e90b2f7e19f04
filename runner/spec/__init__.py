"""What a job asks for: the validated job.yaml and its parts."""
