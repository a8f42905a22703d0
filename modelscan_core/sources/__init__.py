"""Where bytes come from: files on disk, and (later) the members of archives."""
