"""The queue: the file format and every move of a file in, through and out of it.

One module per concern:

    format.py   the queue file format (SPEC §3) and queue ids - the ONLY place that
                reads or writes the format
    files.py    durable file primitives (create + fsync, replace, read)
    writer.py   storing a message durably before the 250 (QueueWriter, GroupCommit)
    reader.py   the queue's one owner: lock, list, read (QueueReader)
    moves.py    finish, rewrite, fail and quarantine (Remover for the unlinks)
    state.py    each message's delivery state next to it (SPEC §7)

Folders (all on the queue's filesystem, so every move is an atomic rename):

    queue.dir/              ready messages, one file each: the only thing the sender pops
    queue.dir/.tmp/         files being written; never seen by the sender
    queue.dir/.state/<id>   a message's delivery state (attempts, next attempt, held)
    queue.dir/.sender.lock  flock'd by the one process that owns the queue
    queue.dir/.<id>.new     a rewrite in progress (renamed over <id>); never listed
    failed/, quarantine/    next to queue.dir (config): messages that will never be sent

Names starting with "." are never messages: the sender and the watch skip them.
"""

from shared.queue.files import FolderStamp, fsync_dir, read_file, write_durably
from shared.queue.format import (
    ARRIVAL_PREFIX,
    QueueFile,
    QueueFormatError,
    arrival_time,
    envelope_of,
    new_queue_id,
)
from shared.queue.moves import FINISH_BACKLOG, REASON_SUFFIX, REWRITE_SUFFIX, Remover
from shared.queue.reader import LOCK_NAME, QueueEntry, QueueReader, QueueScan
from shared.queue.state import BLANK, STATE_DIRNAME, DeliveryState, StateCache, StateStore
from shared.queue.writer import (
    TMP_DIRNAME,
    GroupCommit,
    MessageStore,
    QueueWriteError,
    QueueWriter,
)

__all__ = [
    "ARRIVAL_PREFIX", "BLANK", "FINISH_BACKLOG", "LOCK_NAME", "REASON_SUFFIX", "REWRITE_SUFFIX",
    "STATE_DIRNAME", "TMP_DIRNAME", "DeliveryState", "FolderStamp", "GroupCommit",
    "MessageStore", "QueueEntry", "QueueFile", "QueueFormatError", "QueueReader", "QueueScan",
    "QueueWriteError", "QueueWriter", "Remover", "StateCache", "StateStore", "arrival_time",
    "envelope_of", "fsync_dir", "new_queue_id", "read_file", "write_durably",
]
