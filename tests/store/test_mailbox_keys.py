"""
Stable mailbox keys (pymaild.store.keys, MaildirStore.setMailboxKey): a user whose address
changes keeps their mailbox; an address given to someone new does not hand them the old
owner's mail; a directory from before keys were configured is adopted; the map survives a
restart (a new process).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from pymaild.store.keys import FILENAME, MailboxKeys
from pymaild.store.maildir import MaildirStore


def deliver(store, user, text=b"Subject: x\r\n\r\nhi\r\n"):
    store.user(user).folder("INBOX").append(text)


def count(store, user) -> int:
    folder = store.user(user).folder("INBOX")
    folder.sync()
    return folder.status()["messages"]


def test_an_address_change_keeps_the_mailbox(tmp_path):
    store = MaildirStore(tmp_path)
    store.setMailboxKey("alice@example.com", "uuid-alice")
    deliver(store, "alice@example.com")
    # (the directory renames her: from now on the directory names her a.smith@)
    store.setMailboxKey("a.smith@example.com", "uuid-alice")
    assert store.userDirectory("a.smith@example.com") == tmp_path / "example.com" / "alice"
    assert count(store, "a.smith@example.com") == 1
    assert store.user("a.smith@example.com") is store.user("alice@example.com")  # (one store per directory)
    assert not (tmp_path / "example.com" / "a.smith").exists()


def test_a_recycled_address_gets_a_fresh_mailbox(tmp_path):
    store = MaildirStore(tmp_path)
    store.setMailboxKey("alice@example.com", "uuid-old")
    deliver(store, "alice@example.com")
    store = MaildirStore(tmp_path)  # (the old alice left; a new alice arrives, after a restart)
    store.setMailboxKey("alice@example.com", "uuid-new")
    home = store.userDirectory("alice@example.com")
    assert home.parent == tmp_path / "example.com" and home.name.startswith("alice~") and len(home.name) == 14
    assert count(store, "alice@example.com") == 0
    assert MailboxKeys(tmp_path).directories() == {"uuid-old": "example.com/alice", "uuid-new": f"example.com/{home.name}"}


def test_an_existing_unclaimed_directory_is_adopted(tmp_path):
    store = MaildirStore(tmp_path)
    deliver(store, "bob@example.com")  # (mail from before [ldap] mailbox_attribute, or passwd-file days)
    store = MaildirStore(tmp_path)
    store.setMailboxKey("bob@example.com", "uuid-bob")
    assert count(store, "bob@example.com") == 1
    store.setMailboxKey("bob@example.com", None)  # (an entry without the attribute: no change)
    assert count(store, "bob@example.com") == 1


def test_the_map_is_on_disk_when_place_returns(tmp_path):
    """A new key is committed before it is used: another process (a restart) sees it."""
    keys = MailboxKeys(tmp_path)
    assert keys.place("k1", "example.com/alice") == "example.com/alice"
    assert keys.place("k2", "example.com/alice") != "example.com/alice"
    script = textwrap.dedent(f"""
        import sys
        from pymaild.store.keys import MailboxKeys
        print(sorted(MailboxKeys(sys.argv[1]).directories().items()))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr(sorted(keys.directories().items()))
    assert (tmp_path / FILENAME).is_file()
