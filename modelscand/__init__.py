"""modelscand: the daemon that watches model caches and scans what lands."""
