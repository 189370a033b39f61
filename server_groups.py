"""Groups: who is in which group, who owns it, and each group's one sequence.

Pure state and rules, no I/O: the relay (`chat_server.Relay`) owns a
`GroupTable` on its loop thread, asks it whether a request may be done
(`GroupRefused` carries the error code and a sentence for a person), makes
the change here, and turns what changed into a typed store operation
(`server_store.StoreGroupItem`, ...) and the members' GROUP_DELIVERs and
GROUP_EVENTs.

One sequence per group: every message and every membership change of a
group takes the next `group_seq` from `GroupTable.next_seq`, the only place
one is given out (a Redis store would replace it with an INCR or a stream
id), so all members see one order. A member sees the group's entries from
the one that added them (`Member.joined_seq`) on; a member who left or was
removed sees up to the entry that says so (`Member.left_seq`) and nothing
after, and is kept here as a former member only until their client has
everything up to it. What each member has is one number, `Member.cursor`:
the highest `group_seq` their client receipted (delivery is in order on
the group's stream, so a receipt of seq k covers everything up to k): no
row per member per message.

Nor a row per copy for the senders: who has a message follows from the
cursors, so what a sender is owed is one number per group too,
`Group.owed[sender] = [told, last]`: its client was told every delivery of
its messages up to `told` (the relay moves it once those notices are acked,
to the group's low-water mark: every member has everything below it), and
its last message is at `last`. A sender whose `told` reached `last` is owed
nothing and dropped from there; a login recomputes from the log what lies
between. Entries below both the low-water mark and every owed sender's
`told` are had by everyone and told to everyone: the log is trimmed there.

What waits in the log for a member is bounded like a mailbox (audit14 L2):
the entries past the lowest current member's cursor, and their bytes, are
counted from running totals (`Group.ends`, one cumulative byte count per
entry past the trim, and `Group.low`), and a message over the limits is
refused naming that member (`Group.backlog`, `Relay._backlog_full`). A
former member still owed entries (removed while offline), or a sender still
owed notices, holds only what is theirs: (cursor, left_seq] or (told, last]
stays in the log, and what lies between those and the lowest current
member's cursor, which nobody needs, is cut out of it (`Group.trim_plan`: a
hole), so removing the member who holds a group back lets it go on.

Ownership passes to the longest-standing member when the owner leaves
(members are kept in joining order); the group ends with its last member.
If a former member is still owed entries then (removed while offline; or
the last member themselves, whose client had not yet everything before
their leaving: owed up to their LEFT, like any leaver), or a sender
notices of who had their messages (away meanwhile), the group goes
on under another key (`retired_key`), its name free for a new group at
once, until they have what they are owed (`GroupTable.close`).
"""

from __future__ import annotations

from array import array
from collections.abc import Container

from common import size_text
from protocol import (
    GROUP_REQUEST_USERS_MAX,
    ErrorCode,
    GroupChange,
    LocalProtocolError,
    conversation_stream,
    group_address,
    name_key,
    normalize_name,
)

__all__ = [
    "TOMBSTONE",
    "backlog_full_text",
    "Group",
    "GroupRefused",
    "GroupTable",
    "Member",
    "group_name",
    "is_retired",
    "retired_key",
]

#: Default cap on a group's members: Signal's hard limit (issue 14).
DEFAULT_MAX_MEMBERS = 1000
#: Default cap on the groups one user is in (`GroupTable.check_memberships`).
DEFAULT_MAX_USER_GROUPS = 5000
#: A deleted account's former membership is kept under "!KEY!LEFT_SEQ": no
#: user key has a '!' (the name rules), and the seq keeps two apart.
TOMBSTONE = "!"


class GroupRefused(Exception):
    """A group request that may not be done: `code` goes to the client
    (GROUP_RESULT or FAIL), the message says why and what to do."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Member:
    """One member of a group (or a former one still being caught up)."""

    __slots__ = ("key", "name", "joined_seq", "rank", "left_seq", "cursor", "earlier")

    def __init__(
        self, key: str, name: str, joined_seq: int, rank: int, left_seq: int | None = None,
        cursor: int | None = None, earlier: tuple[tuple[int, int], ...] = (),
    ) -> None:  # fmt: skip
        self.key = key
        self.name = name
        self.joined_seq = joined_seq  # the entry that added them: the first they see
        self.rank = rank  # joining order among those added by one entry
        self.left_seq = left_seq  # the entry that removed them (the last they see), or None
        # The highest group_seq their client has receipted (or passed over:
        # their own messages); below joined_seq until the first receipt.
        self.cursor = joined_seq - 1 if cursor is None else cursor
        # One removed and added again before they had everything of their
        # earlier membership, or before every sender was told what they had
        # of it: its entries (first, last) are theirs too (`GroupTable._join`).
        self.earlier = earlier

    def sees(self, seq: int) -> bool:
        """Whether the entry `seq` is for this member."""
        if self.joined_seq <= seq and (self.left_seq is None or seq <= self.left_seq):
            return True
        return any(first <= seq <= last for first, last in self.earlier)

    @property
    def gone(self) -> bool:
        """A former member whose account was deleted before they had
        everything meant for them: kept under a tombstone key (`bury`) only
        so that senders are told they never will."""
        return self.key.startswith(TOMBSTONE)

    @property
    def caught_up(self) -> bool:
        """A former member whose client has everything meant for them (or
        never will: gone)."""
        return self.left_seq is not None and (self.cursor >= self.left_seq or self.gone)


class Group:
    __slots__ = ("key", "name", "owner", "seq", "members", "former", "owed", "trimmed",
                 "trim_checked", "trim_blocker", "epoch", "changed", "ends", "counted", "low",
                 "low_key", "holed", "exempt")  # fmt: skip

    def __init__(self, key: str, name: str, owner: str, seq: int = 0) -> None:
        self.key = key
        self.name = name  # the display name, without '#'
        self.owner = owner  # a member's key
        self.seq = seq  # the last group_seq given out
        # Cluster mode: which group of this name (the server_msg_id of its
        # CREATED entry: a name taken again is another group) and the seq of
        # its last membership change, against which a node's plan of a
        # change is checked (`GroupTable.apply`, docs/CLUSTER.md).
        self.epoch = 0
        self.changed = 0
        # Current members by key, in joining order: the first is the
        # longest-standing (it becomes owner when the owner leaves).
        self.members: dict[str, Member] = {}
        # Removed or left, until their client has the entry that says so
        # (and every sender was told what they had).
        self.former: dict[str, Member] = {}
        # Senders owed "delivered by" notices: key -> [told, last] (see above).
        self.owed: dict[str, list[int]] = {}
        # Log entries up to this seq are gone (a group made again under a
        # name numbers on from the old one's last seq: none of its log).
        self.trimmed = seq
        self.trim_checked = 0  # group.seq when the trim bound was last worked out
        self.trim_blocker: str | None = None  # whose cursor or mark held it there
        # One server: the bytes of the log's text up to each seq from
        # `counted` on (ends[i] - ends[0] covers counted + 1 .. counted + i),
        # appended to by `GroupTable.next_seq`, cut by `GroupTable.trim` up
        # to the lowest current member's cursor (nothing below it is asked
        # for): the backlog's bytes past any seq in two reads, never a walk
        # of the log. 8 bytes an entry, and there are at most
        # `mailbox_messages` past that cursor. (A cluster counts in Redis.)
        self.ends = array("Q", [0])
        self.counted = seq
        # The lowest current member's cursor as last worked out, and whose
        # (`lowest_member`): never above the real one (cursors only move up,
        # a member leaving only raises it, one joining comes in at the end;
        # one added again who goes on from an earlier cursor lowers it:
        # `GroupTable._join`), so a backlog counted from it is never short.
        self.low = seq
        self.low_key: str | None = None
        self.holed = 0  # the last seq cut out of the log by a hole (`trim_plan`)
        # Cluster mode: sender key -> up to where this node last told the
        # shared store her messages may go in a hole (`Relay._share_trim`).
        self.exempt: dict[str, int] = {}

    def low_water(self) -> int:
        """The highest seq every member has, and every former member still
        to catch up (a caught-up former member has all they will get)."""
        low = self.seq
        for m in self.members.values():
            if m.cursor < low:
                low = m.cursor
        for m in self.former.values():
            if not m.caught_up and m.cursor < low:
                low = m.cursor
        return low

    def trim_bound(self) -> tuple[int, str | None]:
        """The log's entries up to here are had by everyone they are for,
        and every sender was told: nobody reads them again; and the member
        or sender whose place holds it there (None: nobody, it is `seq`)."""
        bound, blocker = self.seq, None
        for m in self.members.values():
            if m.cursor < bound:
                bound, blocker = m.cursor, m.key
        for m in self.former.values():
            if not m.caught_up and m.cursor < bound:
                bound, blocker = m.cursor, m.key
        for key, (told, _) in self.owed.items():
            if told < bound:
                bound, blocker = told, key
        return bound, blocker

    def lowest_member(self) -> tuple[int, str | None]:
        """The lowest cursor of a current member, and whose (None: no member
        is behind, it is `seq`); kept as `low`, `low_key`."""
        low, key = self.seq, None
        for m in self.members.values():
            if m.cursor < low:
                low, key = m.cursor, m.key
        self.low, self.low_key = low, key
        return low, key

    def backlog(self) -> tuple[int, int]:
        """(entries, UTF-8 bytes of their text) in the log past `low`: what
        waits for the member furthest behind, from the running totals."""
        low = self.low if self.low > self.counted else self.counted
        ends = self.ends
        at = low - self.counted
        return self.seq - low, ends[-1] - ends[at] if at < len(ends) else 0

    def trim_plan(self, online: Container[str] = ()) -> tuple[int, str | None, int, int]:
        """(bound, blocker, first, last): `trim_bound`, and a hole of the
        log, first..last (none if first > last), that nobody needs: past
        the entries still owed to each former member behind the current
        members (up to their `left_seq`) and to each sender still owed
        notices (up to their last message: a login reads only theirs,
        `Relay._read_sent`), up to the lowest current member's cursor (each
        of them has it). A sender in `online` (the caller names only those
        with no notice of the group unacked or being worked out at a login)
        was told every delivery made, and every delivery of an entry below
        that cursor is made (those behind it do not see it): their mark
        stays, held by a former member, but they need no entry of the hole.
        A sender offline, or online with notices under way (a session that
        stopped hearing us lives until its timeout), holds what is theirs:
        their next login tells it again from the log. Works out `low` too."""
        bound, blocker = self.trim_bound()
        low, _ = self.lowest_member()
        tail = max(bound, self.holed)
        for m in self.former.values():
            left = m.left_seq or 0
            if not m.caught_up and m.cursor < low and left > tail:
                tail = left
        for key, (told, last) in self.owed.items():
            if told < low and last > tail and key not in online:
                tail = last
        return bound, blocker, tail + 1, low

    def audience(self, seq: int) -> list[Member]:
        """Everyone the entry `seq` is for: those who were members there."""
        found = [m for m in self.members.values()
                 if m.joined_seq <= seq or (m.earlier and m.sees(seq))]  # fmt: skip
        found.extend(m for m in self.former.values() if m.sees(seq))
        return found

    def member(self, key: str) -> Member | None:
        """A member or a former member still catching up."""
        return self.members.get(key) or self.former.get(key)

    def owner_name(self) -> str:
        owner = self.members.get(self.owner)
        return owner.name if owner is not None else ""


def group_name(text: str) -> tuple[str, str]:
    """(display name, key) of a group name as typed, '#' or not; the
    user-name rules apply (`GroupRefused` with INVALID_NAME otherwise)."""
    bare = text[1:] if text.startswith("#") else text
    try:
        shown = normalize_name(bare)
    except LocalProtocolError as exc:
        raise GroupRefused(ErrorCode.INVALID_NAME, f"group name: {exc}") from None
    return shown, name_key(shown)


def backlog_full_text(group: str, who: str, count: int, waiting: int) -> str:
    """The text of a message refused MAILBOX_FULL because what waits in the
    group's log for `who`, its member furthest behind, is at the limits.
    The client reads it back (`client_core.BacklogFull.parse`): change both
    together. The size is said as a person reads it (`10.0 MiB`, fresh8 3)."""
    if not who:
        return f"#{group}'s backlog is full"
    return (
        f"#{group}: {who}'s backlog is full ({count} entries, {size_text(waiting)} wait for "
        f"{who}); it empties as {who} reads, or leaves, or is removed by the owner"
    )


def retired_key(group_key: str, end_id: int) -> str:
    """The key a group that ended goes on under while former members are
    owed entries of it (`GroupTable.retire`): no group name has a '!', and
    `end_id` (the server id of the entry that ended it) keeps two apart, so
    a new group of the same name never mixes with the old one's log."""
    return f"{TOMBSTONE}{group_key}{TOMBSTONE}{end_id}"


def is_retired(group_key: str) -> bool:
    return group_key.startswith(TOMBSTONE)


class GroupTable:
    """Every group of the server, and each user's groups."""

    def __init__(self, max_members: int = DEFAULT_MAX_MEMBERS,
                 max_user_groups: int = DEFAULT_MAX_USER_GROUPS) -> None:  # fmt: skip
        self.max_members = max_members
        self.max_user_groups = max_user_groups
        self.groups: dict[str, Group] = {}
        self.of_user: dict[str, dict[str, None]] = {}  # user key -> keys of their groups
        # user key -> stream -> keys of their groups on that stream: what a
        # datagram of theirs costs is looked up by its chunks' streams, not
        # by walking all their groups (5,000 groups: +4 ms a message, audit7
        # N13). Kept with `of_user` (`_join`, `_part`, `restore`).
        self.streams_of: dict[str, dict[int, list[str]]] = {}
        # user key -> keys of the groups they left and have not caught up on
        self.former_of: dict[str, dict[str, None]] = {}
        # sender key -> keys of the groups where they are owed notices
        self.owed_of: dict[str, dict[str, None]] = {}

    def __len__(self) -> int:
        return len(self.groups)

    def get(self, key: str) -> Group | None:
        return self.groups.get(key)

    def on_stream(self, user_key: str, stream: int) -> list[str]:
        """The keys of `user_key`'s groups whose stream is `stream` (one
        hop's: `conversation_stream` of `#name`); mostly none or one."""
        mine = self.streams_of.get(user_key)
        return mine.get(stream, []) if mine is not None else []

    def _index_stream(self, user_key: str, group: Group) -> None:
        stream = conversation_stream(group_address(group.name))
        keys = self.streams_of.setdefault(user_key, {}).setdefault(stream, [])
        if group.key not in keys:
            keys.append(group.key)

    def _unindex_stream(self, user_key: str, group: Group) -> None:
        mine = self.streams_of.get(user_key)
        if mine is None:
            return
        stream = conversation_stream(group_address(group.name))
        keys = mine.get(stream)
        if keys is not None and group.key in keys:
            keys.remove(group.key)
            if not keys:
                del mine[stream]
                if not mine:
                    del self.streams_of[user_key]

    def user_groups(self, user_key: str) -> list[Group]:
        """The groups `user_key` is a member of, oldest membership first."""
        return [self.groups[k] for k in self.of_user.get(user_key, ())]

    def next_seq(self, group: Group, size: int = 0) -> int:
        """The group's next `group_seq`: the one place a sequence number is
        given out (messages and membership changes alike); `size`: the
        UTF-8 bytes of a message's text, added to the running totals (a
        membership change counts as an entry of none)."""
        group.seq += 1
        ends = group.ends
        ends.append(ends[-1] + size)
        return group.seq

    @staticmethod
    def trim(group: Group, bound: int, low: int) -> None:
        """The log's entries up to `bound` are gone, and every current
        member has those up to `low` (`Group.trim_plan`): the totals of
        both go. (One added again who goes on from an earlier place below
        it is counted from here: what they had still to get of their
        earlier membership was counted when it was made.)"""
        group.trimmed = max(group.trimmed, bound)
        base = max(bound, low)
        if base > group.counted:
            del group.ends[: min(base - group.counted, len(group.ends) - 1)]
            group.counted = base

    @staticmethod
    def count_from(group: Group, sizes: list[tuple[int, int]]) -> None:
        """The running totals of a group read back from the store, from its
        log's (seq, bytes) in order (start-up: never kept, so they never
        drift from the log; a kill -9 loses nothing of them). They start
        after the log's last hole, as `trim` leaves them (review7 F2): what
        lies below it is only what former members and senders are owed (a
        hole ends at the lowest current member's cursor), never a current
        member's backlog, and a slot for each seq cut out would grow them
        by every entry while a former member holds the trim."""
        group.trimmed = sizes[0][0] - 1 if sizes else group.seq
        start = 0
        for i in range(1, len(sizes)):
            if sizes[i][0] > sizes[i - 1][0] + 1:  # a hole ends before it
                start = i
        group.counted = at = sizes[start][0] - 1 if sizes else group.seq
        ends = array("Q", [0])
        total = 0
        for seq, size in sizes[start:]:
            total += size
            ends.append(total)
            at = seq
        while at < group.seq:  # (a seq not in the log)
            ends.append(total)
            at += 1
        group.ends = ends
        group.lowest_member()

    # --- loading (start-up) -----------------------------------------------------

    def restore(self, group: Group) -> None:
        """A group read back from the store, with its members and former members."""
        self.groups[group.key] = group
        for key in group.members:
            self.of_user.setdefault(key, {})[group.key] = None
            self._index_stream(key, group)
        for key, member in group.former.items():
            if not member.gone:
                self.former_of.setdefault(key, {})[group.key] = None

    def take_former(self, group: Group, member: Member) -> None:
        """A former member as the store has it, into a copy without one of
        that key (cluster mode)."""
        if member.key in group.members or member.key in group.former:
            return
        group.former[member.key] = member
        if not member.gone and not member.caught_up:
            self.former_of.setdefault(member.key, {})[group.key] = None

    def restore_owed(self, group: Group, sender_key: str, told: int, last: int) -> None:
        if last > told:
            group.owed[sender_key] = [told, last]
            self.owed_of.setdefault(sender_key, {})[group.key] = None

    def owed_groups(self, sender_key: str) -> list[Group]:
        """The groups where `sender_key` may have deliveries not told yet."""
        return [self.groups[k] for k in self.owed_of.get(sender_key, ()) if k in self.groups]

    def sent(self, group: Group, sender_key: str, seq: int) -> None:
        """`sender_key`'s message at `seq` was committed."""
        entry = group.owed.get(sender_key)
        if entry is None:
            # Owed nothing before: everything of theirs below it was told.
            group.owed[sender_key] = [seq - 1, seq]
            self.owed_of.setdefault(sender_key, {})[group.key] = None
        elif seq > entry[1]:
            entry[1] = seq

    def told(self, group: Group, sender_key: str, seq: int) -> bool:
        """The sender's client was told every delivery up to `seq`; True if
        that moved its mark."""
        entry = group.owed.get(sender_key)
        if entry is None or seq <= entry[0]:
            return False
        entry[0] = seq
        if seq >= entry[1]:
            del group.owed[sender_key]
            self._unindex_owed(sender_key, group.key)
        return True

    def _unindex_owed(self, sender_key: str, group_key: str) -> None:
        mine = self.owed_of.get(sender_key)
        if mine is not None:
            mine.pop(group_key, None)
            if not mine:
                del self.owed_of[sender_key]

    def catching_up(self, user_key: str) -> list[Group]:
        """The groups `user_key` left and has entries of still to get, then
        those they are in: what they are owed of a group that ended comes
        before anything of a new group of the same name (`owed_before`)."""
        keys = [*self.former_of.get(user_key, ()), *self.of_user.get(user_key, ())]
        return [self.groups[k] for k in keys if k in self.groups]

    def owed_before(self, group: Group, user_key: str) -> Group | None:
        """A group of `group`'s name that ended (retired) while `user_key`
        was owed entries of it, and still is: its entries reach them first
        (the two share a name, so a client's stream for it: a new group's
        creation must not come before the old one's "you were removed")."""
        if is_retired(group.key):
            return None
        prefix = f"{TOMBSTONE}{group.key}{TOMBSTONE}"
        for key in self.former_of.get(user_key, ()):
            if key.startswith(prefix):
                old = self.groups.get(key)
                member = old.former.get(user_key) if old is not None else None
                if old is not None and member is not None and not member.caught_up:
                    return old
        return None

    # --- the rules: each raises GroupRefused, or returns what to do -------------

    def member_of(self, group_text: str, user_key: str) -> Group:
        """The group named `group_text` if `user_key` is a member of it."""
        name, key = group_name(group_text)
        group = self.groups.get(key)
        if group is None:
            raise GroupRefused(ErrorCode.NO_SUCH_GROUP, f"there is no group #{name}")
        if user_key not in group.members:
            raise GroupRefused(ErrorCode.NOT_A_MEMBER, f"you are not a member of #{group.name}")
        return group

    def check_users(self, users: tuple[str, ...]) -> None:
        """Refuse (TOO_LONG) a request naming more users than one request
        may; a name given several times (any case) counts once, as it is
        acted on once (`bob bob ...` x 300 names one user). Keyed only when
        over the count, so an ordinary request pays nothing."""
        if len(users) > GROUP_REQUEST_USERS_MAX:
            count = len({name_key(text.strip()) for text in users})
            if count > GROUP_REQUEST_USERS_MAX:
                most = GROUP_REQUEST_USERS_MAX
                raise GroupRefused(ErrorCode.TOO_LONG, f"{count} users in one request; at most "
                                   f"{most}: add the rest in another")  # fmt: skip

    def check_room(self, group_size: int, adding: int) -> None:
        if group_size + adding > self.max_members:
            raise GroupRefused(ErrorCode.GROUP_FULL, f"a group has at most {self.max_members} "
                               f"members; this would make {group_size + adding}")  # fmt: skip

    def check_memberships(self, users: list[tuple[str, str]],
                          planned: dict[str, int] | None = None) -> None:  # fmt: skip
        """Refuse (GROUP_FULL) a create or add that would put a user, (key,
        name), in more than `max_user_groups` groups: every group lives in
        the server's memory, so how many one user makes or is put in is
        bounded (audit14 L3). `planned`: key -> groups they are being put
        in by changes not applied yet (a cluster node's, in flight)."""
        for key, name in users:
            ahead = planned.get(key, 0) if planned else 0
            if len(self.of_user.get(key, ())) + ahead >= self.max_user_groups:
                raise GroupRefused(ErrorCode.GROUP_FULL, f"{name} is in {self.max_user_groups} "
                                   "groups, the most one user may be in")  # fmt: skip

    def check_create(self, group_text: str) -> tuple[str, str]:
        name, key = group_name(group_text)
        if key in self.groups:
            raise GroupRefused(
                ErrorCode.GROUP_EXISTS,
                f"a group #{self.groups[key].name} exists; pick another name",
            )
        return name, key

    # --- the changes ------------------------------------------------------------

    def create(self, name: str, key: str, owner: tuple[str, str],
               others: list[tuple[str, str]], after: int = 0) -> tuple[Group, int]:  # fmt: skip
        """A new group of `owner` (key, name) and `others`; its first entry
        (CREATED, seq `after` + 1) adds them all. `after` is the last seq a
        group of the name had before (one ended, and its name is taken
        again): a name's seqs only grow, so a member's client that holds
        entries of both never takes one for the other's."""
        group = self.groups[key] = Group(key, name, owner[0], after)
        seq = self.next_seq(group)
        for rank, (member_key, member_name) in enumerate([owner, *others]):
            self._join(group, member_key, member_name, seq, rank)
        return group, seq

    def add(self, group: Group, users: list[tuple[str, str]]) -> tuple[int, list[Member]]:
        """Add members: (the entry's seq, those added again who go on from
        their earlier membership: `_join`)."""
        seq = self.next_seq(group)
        again: list[Member] = []
        for rank, (member_key, member_name) in enumerate(users):
            member = self._join(group, member_key, member_name, seq, rank)
            if member.earlier:
                again.append(member)
        return seq, again

    def _join(self, group: Group, key: str, name: str, seq: int, rank: int) -> Member:
        """`key` is a member from entry `seq` on. One removed earlier and
        added again before their client had everything of that membership
        (they get the rest, as if never added again), or before every
        sender was told what they had of it, goes on from it: its entries
        stay theirs (`Member.earlier`), their cursor where it was. Else
        they start afresh from here."""
        member = Member(key, name, seq, rank)
        old = group.former.pop(key, None)
        if old is not None:
            self._unindex_former(key, group.key)
            left = old.left_seq or 0
            if old.cursor < left or not self._all_told(group, key, left):
                member.cursor = old.cursor
                member.earlier = (*old.earlier, (old.joined_seq, left))
        group.members[key] = member
        self.of_user.setdefault(key, {})[group.key] = None
        if member.cursor < group.low:
            group.low, group.low_key = member.cursor, key
        self._index_stream(key, group)
        return member

    def remove(self, group: Group, keys: list[str]) -> int:
        """Remove members (the entry's seq is the last thing they see)."""
        seq = self.next_seq(group)
        for key in keys:
            self._part(group, key, seq)
        return seq

    def leave(self, group: Group, key: str) -> tuple[int, str | None]:
        """`key` leaves: (the LEFT entry's seq, the new owner's key if
        ownership passed). The group is then empty if it had one member."""
        seq = self.next_seq(group)
        self._part(group, key, seq)
        new_owner = None
        if group.owner == key and group.members:
            new_owner = group.owner = next(iter(group.members))
        return seq, new_owner

    def _part(self, group: Group, key: str, seq: int) -> None:
        member = group.members.pop(key)
        member.left_seq = seq
        if not member.caught_up:
            group.former[key] = member
            self.former_of.setdefault(key, {})[group.key] = None
        mine = self.of_user.get(key)
        if mine is not None:
            mine.pop(group.key, None)
            if not mine:
                del self.of_user[key]
        self._unindex_stream(key, group)

    def end(self, group: Group) -> None:
        """The group's last member left: it is gone, and its name is free
        (what former members had still to get goes with it)."""
        self.groups.pop(group.key, None)
        for key in list(group.members):
            self._part(group, key, group.seq)
        for key in group.former:
            self._unindex_former(key, group.key)
        group.former.clear()
        for key in group.owed:
            self._unindex_owed(key, group.key)
        group.owed.clear()

    def close(self, group: Group, seq: int, tomb_key: str) -> list[Member] | None:
        """The group's last member left (its LEFT entry is `seq`): its name
        is free at once. The leaver is like any leaver (audit8 P1, P7):
        owed everything up to and including their LEFT (`Member.left_seq`
        is `seq`; the LEFT is in the log, `Relay._group_leave`), in the
        group's order, whatever their client had (an entry committed and not
        yet handed, in flight, or its receipt held back), and however the
        link behaves (a LEFT handed once outside the log was lost with it).
        If nobody is owed anything of it, it ends (`end`; answers None);
        else it is retired (`retire`) and the answer is the leaver, if kept
        as a former member, for what they are owed or for a sender to be
        told ([] if not)."""
        leavers = list(group.members.values())
        for member in leavers:  # (one): owed up to their LEFT, `seq`
            self._part(group, member.key, seq)
        for member in [m for m in group.former.values() if m.caught_up]:
            self.forget_former(group, member)
        if not self.owes(group) and not (group.owed and group.former):
            self.end(group)
            return None
        self.retire(group, tomb_key)
        return [m for m in leavers if group.former.get(m.key) is m]

    def retire(self, group: Group, tomb_key: str) -> None:
        """The group's last member left (`close`) while a former member is
        still owed entries of it, or a sender notices of who had theirs: it
        goes on under `tomb_key` (a key no group has: see `retired_key`),
        with no member, only until they have what they are owed (nothing is
        posted to it again)."""
        self.groups.pop(group.key, None)
        for key in group.owed:
            self._unindex_owed(key, group.key)
            self.owed_of.setdefault(key, {})[tomb_key] = None
        for key, member in group.former.items():
            if not member.gone:
                self._unindex_former(key, group.key)
                self.former_of.setdefault(key, {})[tomb_key] = None
        group.key = tomb_key
        self.groups[tomb_key] = group

    @staticmethod
    def owes(group: Group) -> bool:
        """Whether a former member of `group` is still owed entries of it."""
        return any(not m.caught_up for m in group.former.values())

    def _unindex_former(self, user_key: str, group_key: str) -> None:
        mine = self.former_of.get(user_key)
        if mine is not None:
            mine.pop(group_key, None)
            if not mine:
                del self.former_of[user_key]

    def bury(self, user_key: str) -> list[tuple[Group, Member, str]]:
        """`user_key` is no former member of any group any more (a deleted
        account: what it had still to get goes with it, and the name's next
        owner inherits none of it): (group, member, its old key) for each.
        One who had everything is dropped; one who had not stays under a
        tombstone key (`Member.gone`), for the senders to be told, until
        they were (`forget_former`)."""
        buried: list[tuple[Group, Member, str]] = []
        for group_key in list(self.former_of.pop(user_key, {})):
            group = self.groups.get(group_key)
            member = group.former.pop(user_key, None) if group is not None else None
            if group is None or member is None:
                continue
            if member.cursor < (member.left_seq or 0):
                member.key = f"{TOMBSTONE}{user_key}{TOMBSTONE}{member.left_seq}"
                group.former[member.key] = member
            buried.append((group, member, user_key))
        for group_key in list(self.owed_of.pop(user_key, {})):  # nobody left to tell
            group = self.groups.get(group_key)
            if group is not None:
                group.owed.pop(user_key, None)
        return buried

    @staticmethod
    def _all_told(group: Group, member_key: str, upto: int) -> bool:
        """Whether every sender but `member_key` (nobody is told of their
        own copy) was told every delivery up to `upto`."""
        return all(told >= upto for key, (told, _) in group.owed.items() if key != member_key)

    def forget_former(self, group: Group, member: Member) -> bool:
        """Drop a former member who has caught up, once every sender was
        told what they had (a login recomputes that from the members);
        True if dropped."""
        if (
            member.caught_up
            and group.former.get(member.key) is member
            and self._all_told(group, member.key, member.left_seq or 0)
        ):
            del group.former[member.key]
            if not member.gone:
                self._unindex_former(member.key, group.key)
            return True
        return False

    # --- cluster mode: entries made elsewhere, applied here in order ------------

    def apply(self, group: Group | None, key: str, name: str, seq: int, server_msg_id: int,
              change: int, by_key: str, users: tuple[str, ...]) -> Group | None:  # fmt: skip
        """Cluster mode: entry `seq` of the group `key`, as the shared log
        holds it, made in this node's copy (`group`: None for a CREATED
        entry). The caller applies a group's entries in order, each once
        (`seq` is `group.seq + 1`), so every node's copy is a prefix of the
        one log and the rules' verdicts agree. Answers the group (None when
        the entry does not fit: the caller reads the group's state instead)."""
        if change == GroupChange.CREATED:
            if group is not None or not users:
                return None
            group = self.groups[key] = Group(key, name, by_key)
            group.epoch = server_msg_id
            for rank, member_name in enumerate(users):
                self._join(group, name_key(member_name), member_name, seq, rank)
        elif group is None or seq != group.seq + 1:
            return None
        elif change == GroupChange.ADDED:
            for rank, member_name in enumerate(users):
                self._join(group, name_key(member_name), member_name, seq, rank)
        elif change == GroupChange.REMOVED:
            for member_name in users:
                if name_key(member_name) in group.members:
                    self._part(group, name_key(member_name), seq)
        elif change == GroupChange.LEFT:
            if by_key in group.members:
                self._part(group, by_key, seq)
        elif change == GroupChange.OWNER:
            if users and name_key(users[0]) in group.members:
                group.owner = name_key(users[0])
        group.seq = seq
        if change:
            group.changed = seq
        return group
