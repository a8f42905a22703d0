"""Quarantine: move a malicious model file out of reach, keep a ledger operators can trust.

A root daemon that moves files out of users' directories is itself an attack surface (a user
swaps a directory for a symlink and the scanner moves someone else's file, ClamAV
CVE-2020-3350), so every piece here is small and works through file descriptors:

  ledger.py     append-only JSON Lines, fsync'd, hash-chained across rotated segments; the
                one source of truth (it is also the journal each move is recovered from)
  index.py      the ledger folded into entries: state, allow-list, repeats
  store.py      the quarantine directories (one per filesystem, root-owned 0700) and the lock
  mover.py      the move itself (rename by dir fd, or a journaled copy across filesystems),
                restore, purge, and recovery of whatever a kill interrupted
  tombstone.py  what stays in the file's place so a load fails naming the quarantine
  hf.py         the Hugging Face names (repo, revision, file) of a blob, and their links
  action.py     the daemon's `Action` for quarantine mode (threshold, allow-list, repeats, hook)
  review.py     list / show / restore / purge / verify as data
  cli.py        ``modelscand quarantine ...``
"""

from __future__ import annotations


class QuarantineError(Exception):
    """A quarantine operation that cannot go on; the message is one line for an operator."""
