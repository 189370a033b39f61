"""Cluster mode (issue 15): several relay nodes serve one set of users through
one Redis, the source of truth for everything they share.

`RedisStore` is a `server_store.MessageStore` on Redis, behind one thread
like `ServerStore`: the loop submits typed operations, the thread applies
each batch as one MULTI/EXEC pipeline (the group commit: everything queued
while the previous batch waited for Redis), and only after EXEC returned,
with Redis on `appendfsync always`, does an operation's callback go back to
the loop, so an ACCEPT still means durable. `RedisRouter` is a
`server_router.Router`: each node keeps its own sessions in memory and a
cache of the other nodes' routes, fed by Redis pub/sub. A second thread
listens on that pub/sub and hands what it hears to the loop as callbacks
(`ClusterEvents`: the cluster's inputs on `chat_server.Relay`).

What lives where in Redis (`{key}` is a user's name key; the braces are
Redis Cluster hash tags, so a user's keys stay on one shard):

- `chat:accounts`: hash, name key -> account (SCRAM verifiers only: salt,
  iterations, StoredKey, ServerKey; never a password or a session key).
- `chat:secret`: the cluster's secret (login cookies, tickets, the server's
  Diffie-Hellman key), so a client pinned to one node's key and holding
  one node's ticket logs in on any node.
- `chat:next_id`: server message ids are reserved from it in blocks of
  `ID_BLOCK` (one per node start, with INCRBY: never reused, even after a
  crash); they name a message to its sender (ACCEPT) and in dedup keys.
- `chat:mbox:{key}`: the user's mailbox, a Stream. Each accepted message
  is one entry, added by the sender's node in the same script as its dedup
  key; the entry id is the mailbox's one order, and the number made of it
  (`entry_number`) is the `server_msg_id` the recipient sees and receipts.
  The entry is deleted (XDEL) when the recipient's client receipts it, in
  the same script that queues the sender's receipt, and only if it was
  still there: a receipt repeated, or retried after a lost reply, queues
  nothing twice.
- `chat:notes:{key}` (Stream) and `chat:noteidx:{key}` (hash, "instance:seq"
  -> entry id): receipts waiting for the sender, deleted when its client
  has them (NoticeDone).
- `chat:dedup:{key}:INSTANCE:SEQ`: a sent message's id -> its server id
  and content digest, kept `DEDUP_KEEP_S` (SET NX EX). The mailbox entry is
  added only if this key was new, so a retry on another node, or a batch
  applied again after a lost reply, never stores a message twice.
- `chat:route:{key}`: the node a user is logged in on, with a TTL of
  `ROUTE_TTL`, renewed by that node every `ROUTE_RENEW` while the session
  lives: a node that dies loses its users' routes within one TTL.

Why a stream per user (mailbox) rather than per node: the mailbox must
outlive the node a user happens to be on; with a stream per user, moving
to another node moves nothing (the new node reads the same stream from its
start: what the old node handed over and the client never receipted is
still there, so it comes again, once, and the client shows a message id
once), a dead node leaves no queue behind that someone must claim, and a
Redis Cluster shards users, not nodes. The price: a node does not learn of
new entries by blocking on one stream of its own; the script that adds an
entry publishes a short notice (`chat:node:NODE`) to the node the
recipient's route names at that moment, read from Redis inside the same
script, so it is never stale. A node whose pub/sub link broke reads every
local session's mailbox again when it is back (`ClusterEvents.resync`).
We read with XRANGE from the session's cursor instead of a consumer group:
the relay's pager already is the consumer's state (what was handed over
and not receipted), and a group would keep a second copy of it (a PEL per
node) that a move must XAUTOCLAIM; a plain read from the start of the
mailbox is the equivalent claim, and XDEL on receipt is the XACK.

Groups (issue 14) keep one sequence per group across the nodes. A group's
keys share its hash tag `{#key}`: `chat:group:` (name, owner, `epoch`,
`seq`, `changed`), `chat:gmem:` and `chat:gformer:` (members and former
members still owed entries, or still to be named to a sender),
`chat:gcur:` (each member's cursor: the highest seq their client
receipted), `chat:glog:` (the log, a Stream whose entry ids are "SEQ-0",
so the stream's order is the group's), `chat:greq:` (requests' answers)
and `chat:gtold:` / `chat:gsent:` (per sender: up to which seq its client
was told who has its messages, and its last message's seq: "delivered by"
follows from the cursors, as on one server; a sender on another node is
told through a notice, `TellReached`); `chat:groups` lists the groups.
`chat:gmark:` outlives the group: the last seq a group of the name had
when it ended, where one made again under the name goes on (a name's seqs
only grow, so a member's client never takes one group's entry for the
other's; the SQLite store's `group_names`).
Every seq is given out by a script, inside Redis, never by a node:

- a message (`PostGroupMessage`): the script checks its sender is a member
  at that moment and takes the next seq (HINCRBY), with the dedup key. The
  store, not the node, judges membership, because a node's copy may not
  have heard of a removal made on another node a millisecond ago;
- a membership change (`ChangeGroup`): the rules (owner, cap, who may add
  whom, who inherits) are the relay's, the same code as on one server; a
  node plans the change's entries on its copy of the group, and the script
  applies them only if the group has had no membership change since the
  one the copy has (compare-and-set on `epoch` and `changed`); otherwise
  it answers "conflict" and the node catches up and plans again. Messages
  do not move `changed`, so a burst of posts never makes a change retry.

Why not the other way round (the node numbering, Redis checking the seq it
expected): two nodes posting at once would conflict at every message, and
each conflict costs a round trip and a refresh; a seq given out inside the
script never conflicts, and a message needs no rule but membership. Why not
every rule in Lua: the rules would exist twice, and changes are rare.

Each entry stored announces itself to every node ("g KEY EPOCH SEQ" on
`chat:all`); a node reads the log past its copy's seq and applies the
entries in order (`server_groups.GroupTable.apply`), then hands each to its
own members, so every node's copy is a prefix of the one log, and members
on every node get the same sequence. `epoch` (the CREATED entry's server
id) tells a group from an earlier one of the same name. Notices are not
kept: at every beat (`ROUTE_RENEW`) a node reads every group's (epoch,
seq) and catches up on what a lost notice left behind.

Broadcasts on `chat:all`: a registration (so every node knows the account
at once), a changed password ("u") and a deleted account ("x": its name
quarantined on every node), a login ("on": the user's session on any other node is taken
over, `logged_in_elsewhere` for another client), a logout ("off"), and each
node's "alive" beat (a node silent for `ROUTE_TTL` is gone, and its users
offline in the other nodes' caches).

Losing Redis: the store thread retries the same batch every `RETRY_S`;
nothing of it is acknowledged meanwhile (clients keep `sending` and
retransmit), it says so in one log line, and another when Redis is back.
Each script is idempotent, so applying a batch again after a reply was lost
is safe.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import queue
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common import format_address
from protocol import ErrorCode
from server_groups import TOMBSTONE, is_retired, retired_key
from server_records import Session, User
from server_router import NodeId, Route
from server_store import (
    DEDUP_KEEP_S,
    GROUP_DEDUP_PREFIX,
    Account,
    Answer,
    BuryMember,
    ChangeGroup,
    DropMember,
    EraseAccount,
    FindDedup,
    FindGroupItem,
    GroupItem,
    GroupReceipt,
    GroupTold,
    Loaded,
    LoadedGroup,
    LoadedMember,
    MarkDelivered,
    MarkDelivereds,
    NoticeDone,
    Op,
    PostGroupMessage,
    Query,
    Read,
    ReadGroupCursors,
    ReadGroupLog,
    ReadGroupSent,
    ReadGroupState,
    ReadMailbox,
    ReadNotices,
    Reserve,
    StoreAccount,
    StoredMessage,
    StoreError,
    StoreMessage,
    Sync,
    TellReached,
    Then,
    TrimGroup,
    UpdateAccount,
    content_digest,
)

__all__ = [
    "ClusterAddress", "ClusterError", "ClusterEvents", "RedisRouter", "RedisStore",
    "entry_id", "entry_number", "open_cluster", "parse_cluster_url",
]  # fmt: skip

log = logging.getLogger("server_cluster")

DEFAULT_REDIS_PORT = 6379
#: Server message ids one node start reserves (INCRBY): 2**40 is 35 years at
#: 1,000 messages a second, so a node never needs a second block; ids stay
#: far below the mailbox numbers (`entry_number`, about 2**61), which the
#: relay's pagers compare with them.
ID_BLOCK = 1 << 40
#: A group post's limits when its operation sets none (`PostGroupMessage`).
UNBOUNDED = 1 << 50
#: Bits of a stream entry id's sequence part in `entry_number`: Redis numbers
#: entries added in the same millisecond to one stream 0, 1, 2...; a million
#: in one millisecond to one mailbox does not happen.
SEQ_BITS = 20
ROUTE_TTL = 20  # seconds a route lives unless its node renews it
ROUTE_RENEW = 5.0  # seconds between a node's renewals of its routes (and its "alive" beat)
RENEW_CHUNK = 500  # routes renewed per script call
RETRY_S = 0.5  # between attempts at a batch while Redis cannot be reached
RELAPSE_S = 5.0  # a link lost again this soon after it came back: the same outage, not logged again
SOCKET_TIMEOUT = 5.0  # seconds a Redis command may take before the link counts as lost
CONNECT_TIMEOUT = 2.0
MAX_BATCH = 5000  # operations in one MULTI at most
# Entries one `TRIM_GROUP` call cuts out of a log at most (the next goes on):
# a hole grown long before it could be cut never blocks Redis for long.
HOLE_MAX = 2_000
NOTICE_BATCH = 1000  # pub/sub notices handed to the loop with one wake-up at most
BROADCAST = "chat:all"
NODE_CHANNEL = "chat:node:"

# --- the scripts: each one atomic and idempotent (a batch may be applied again) ---

# Entries are one field, `m`, holding the entry's values packed in JSON
# (`pack_entry`): eight arguments instead of twenty per message, and encoding
# the arguments is most of what a node spends on Redis.
#
# KEYS: dedup key, mailbox, recipient's route, mailbox size. ARGV: dedup
# value, its TTL, recipient key, UTF-8 bytes, the packed entry. Answers the
# mailbox's size after it ("messages:bytes").
STORE_MESSAGE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  local id = redis.call('XADD', KEYS[2], '*', 'm', ARGV[5])
  redis.call('HINCRBY', KEYS[4], 'n', 1)
  redis.call('HINCRBY', KEYS[4], 'b', ARGV[4])
  local node = redis.call('GET', KEYS[3])
  if node then redis.call('PUBLISH', 'chat:node:' .. node, 'm\t' .. ARGV[3] .. '\t' .. id) end
end
local size = redis.call('HMGET', KEYS[4], 'n', 'b')
return (size[1] or '0') .. ':' .. (size[2] or '0')
"""
# KEYS: recipient's mailbox, sender's receipts, their index, sender's route,
# mailbox size. ARGV: entry id, index field, sender key, the packed receipt,
# UTF-8 bytes, "1" when the sender's client was told already (`told`: no
# receipt to queue). Answers the mailbox's size after it ("messages:bytes").
MARK_DELIVERED = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[5], 'n', -1) <= 0 then redis.call('DEL', KEYS[5])
  else redis.call('HINCRBY', KEYS[5], 'b', -ARGV[5]) end
  if ARGV[6] ~= '1' and redis.call('HEXISTS', KEYS[3], ARGV[2]) == 0 then
    local id = redis.call('XADD', KEYS[2], '*', 'm', ARGV[4])
    redis.call('HSET', KEYS[3], ARGV[2], id)
    local node = redis.call('GET', KEYS[4])
    if node then redis.call('PUBLISH', 'chat:node:' .. node, 'n\t' .. ARGV[3] .. '\t' .. id) end
  end
end
local size = redis.call('HMGET', KEYS[5], 'n', 'b')
return (size[1] or '0') .. ':' .. (size[2] or '0')
"""
# KEYS: receipts, index. ARGV: index field.
NOTICE_DONE = """
local id = redis.call('HGET', KEYS[2], ARGV[1])
if id then
  redis.call('XDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return 1
"""
# KEYS: accounts, quarantine, then the user's mailbox, its size, receipts,
# their index. ARGV: name key, account. Answers the account that holds. A
# new account takes nothing over from a deleted one of the same name.
STORE_ACCOUNT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('PUBLISH', 'chat:all', 'a\t' .. ARGV[1] .. '\t' .. ARGV[2])
  return ARGV[2]
end
return redis.call('HGET', KEYS[1], ARGV[1])
"""
# KEYS: accounts. ARGV: name key, account (a changed password).
UPDATE_ACCOUNT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('PUBLISH', 'chat:all', 'u\t' .. ARGV[1] .. '\t' .. ARGV[2])
end
return 1
"""
# KEYS as STORE_ACCOUNT's. ARGV: name key, quarantined until (ms). The
# account and what is kept for it go (its dedup keys expire on their own:
# a later owner's client has other instance ids).
ERASE_ACCOUNT = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PUBLISH', 'chat:all', 'x\t' .. ARGV[1] .. '\t' .. ARGV[2])
return 1
"""
# KEYS: route. ARGV: node, TTL, name key, client instance.
BIND = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', 'chat:all', 'on\t' .. ARGV[3] .. '\t' .. ARGV[1] .. '\t' .. ARGV[4])
return 1
"""
# KEYS: route. ARGV: node, name key. Only this node's own route goes.
UNBIND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', 'chat:all', 'off\t' .. ARGV[2] .. '\t' .. ARGV[1])
end
return 1
"""
# KEYS: routes. ARGV: node, TTL. A route another node took is left alone and
# answered (that login's notice was missed: the session here ends); one that
# expired while Redis was away is set again.
RENEW = """
local taken = {}
for _, key in ipairs(KEYS) do
  local node = redis.call('GET', key)
  if not node or node == ARGV[1] then redis.call('SET', key, ARGV[1], 'EX', ARGV[2])
  else taken[#taken + 1] = key end
end
return taken
"""

# --- groups: one sequence per group, given out here (docs/CLUSTER.md) ---
#
# A group's keys share its hash tag `{#key}`: `chat:group:` (hash: name,
# owner, epoch, seq, changed), `chat:gmem:` (current members: key -> [name,
# joined_seq, rank]), `chat:gformer:` (former members still owed entries:
# key -> [name, joined_seq, rank, left_seq]), `chat:gcur:` (key -> cursor),
# `chat:glog:` (the log: a stream whose entry ids are "SEQ-0", so the
# stream's order is the group's) and `chat:greq:` (requests' answers).
# Every entry announces itself to every node: "g KEY EPOCH SEQ".
#
# A message. KEYS: dedup key, group, members, log, id key, senders' last
# messages, cursors, senders' marks (a sender owed nothing before is told of
# everything below her message: her mark goes there, as on one server, so
# that it never holds the log's trim at 0). ARGV: dedup value ("server
# id:digest"), its TTL, sender key, the packed entry, group key, the text's
# UTF-8 bytes, the mailbox limits (messages, bytes). The sender must be a
# member here, now: the script is the judge, so a node's copy that has not
# heard of a removal yet cannot let one through. The entry's field `s` names
# its sender (a sender's messages are found by it: `READ_SENT`), `p` the
# bytes of the group's text before it (the group's `bytes` is the running
# total, so the bytes past any entry are two reads). What waits for the
# member furthest behind is bounded like a mailbox (audit14 L2): over the
# limits the message is refused ('full', that member's key, "entries:bytes";
# of members equally far behind, one other than the sender). The log's bytes
# are the running total less the first entry's `p` and the bytes of the
# holes cut past it (`hbytes`, kept by `TRIM_GROUP`). Only when the log is
# over the limits is the member furthest behind looked for, and then from
# the group's `low` (a cursor no current member is below: cursors only move
# up, a member added starts at the end, and a membership change drops it)
# and `lowkey` (whose it was): the members' cursors are walked only when
# that bound says "over" and is not exact any more (its member moved or
# left, or is the sender), never at every post (review7 F6: a removed
# member's entries kept the log over the limits, and each post walked 1,000
# members' cursors, ~1,000 calls with Redis blocked).
GROUP_POST = """
local function bytes_before(start)
  local e = redis.call('XRANGE', KEYS[4], start, '+', 'COUNT', 1)
  if #e == 0 then return nil end
  local f = e[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'p' then return tonumber(f[i + 1]) end
  end
  return 0
end
local old = redis.call('GET', KEYS[1])
if old then return {'dup', old} end
local g = redis.call('HMGET', KEYS[2], 'epoch', 'bytes', 'hbytes', 'seq', 'low', 'lowkey')
local epoch = g[1]
if not epoch then return {'nogroup'} end
if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 0 then return {'notmember'} end
local total = tonumber(g[2] or '0')
local size, most, most_bytes = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local logged = total - (bytes_before('-') or total) - tonumber(g[3] or '0')
if redis.call('XLEN', KEYS[4]) >= most or logged + size > most_bytes then
  local last = tonumber(g[4] or '0')
  local function over(low)
    local waiting = total - (bytes_before((low + 1) .. '-0') or total)
    return last - low >= most or waiting + size > most_bytes, waiting
  end
  local low, who = tonumber(g[5] or '-1'), g[6] or ''
  local full, waiting = false, 0
  if low >= 0 then full, waiting = over(low) end
  if low < 0 or (full and not (who ~= ARGV[3] and redis.call('HEXISTS', KEYS[3], who) == 1
                               and tonumber(redis.call('HGET', KEYS[7], who) or '-1') == low)) then
    low, who = last, ''
    for _, key in ipairs(redis.call('HKEYS', KEYS[3])) do
      local c = tonumber(redis.call('HGET', KEYS[7], key) or '0')
      if c < low or (c == low and who == ARGV[3]) then low, who = c, key end
    end
    redis.call('HSET', KEYS[2], 'low', low, 'lowkey', who)
    full, waiting = over(low)
  end
  if full then
    return {'full', who, (last - low) .. ':' .. waiting}
  end
end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
local n = redis.call('HLEN', KEYS[3]) - 1
redis.call('XADD', KEYS[4], seq .. '-0', 'm', ARGV[4], 'n', n, 's', ARGV[3], 'p', total)
redis.call('HSET', KEYS[2], 'bytes', total + size)
local prior = redis.call('HGET', KEYS[6], ARGV[3])
local told = tonumber(redis.call('HGET', KEYS[8], ARGV[3]) or '0')
if (not prior or told >= tonumber(prior)) and told < seq - 1 then
  redis.call('HSET', KEYS[8], ARGV[3], seq - 1)  -- (owed nothing before: `GroupTable.sent`)
end
redis.call('HSET', KEYS[6], ARGV[3], seq)
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. seq .. ':' .. n .. ':' .. epoch, 'EX', ARGV[2])
redis.call('SET', KEYS[5], seq .. ':' .. n, 'EX', ARGV[2])
redis.call('PUBLISH', 'chat:all', 'g\t' .. ARGV[5] .. '\t' .. epoch .. '\t' .. seq)
return {'ok', seq .. ':' .. n .. ':' .. epoch}
"""
# A membership change, planned by a node on its copy of the group and
# applied only if no other change came first (compare-and-set on the
# group's epoch and the seq of its last change). KEYS: group, members,
# former, cursors, log, requests, the set of groups. ARGV: group key, name,
# epoch planned against (0: a new group), its last change, request field,
# its answer, the entries (JSON: m packed entry, n recipients, j joined
# [key, name, rank], l left keys), owner after, end ("1": the last member
# left), the epoch of a new group, how long answers are kept, the key the
# group goes on under if it ends while former members are owed entries, or
# senders "delivered by" notices (its KEYS 8-11: group, former, cursors,
# log; `retired_key`; 14-15: its senders' marks and last messages; KEYS
# 12-13 are the group's; 16: the name's mark, `chat:gmark:`, read by a new
# group for its first seq and set when the group ends). The leaver is kept
# then as a former member: owed up to their LEFT, which goes into the log
# (whatever their client had, and however its link behaves: audit8 P1, P7),
# until their client has it (`GroupTable.close`; answered "ok", the LEFT's
# seq, and "1": it was logged). Epoch -1: a
# request the node refused (or found nothing to do for); only its answer, if
# it was done before, is looked up (a request sent again to another node is
# answered, not refused), else the group's epoch and seq are answered: the
# node's copy reaches them and the request is planned again.
# KEYS[17]: every user's count of groups (`USER_GROUPS_KEY`), changed here
# with the members; ARGV[13]: the most groups one user may be in: a change
# that would put someone past it is refused ("full", with their name), so
# the cap holds for changes planned on any node at the same time, which a
# node's copy cannot see (`--max-user-groups`; audit7 N2).
CHANGE_GROUP = """
local done = redis.call('HGET', KEYS[6], ARGV[5])
if done then return {'done', done} end
local g = redis.call('HMGET', KEYS[1], 'epoch', 'changed', 'seq')
if ARGV[3] == '-1' then return {'none', g[1] or '0', g[3] or '0'} end
if ARGV[3] == '0' then
  if g[1] then return {'conflict', g[1], g[3]} end
elseif g[1] ~= ARGV[3] or g[2] ~= ARGV[4] then
  return {'conflict', g[1] or '0', g[3] or '0'}
end
local plan = cjson.decode(ARGV[7])
local cap = tonumber(ARGV[13])
local joining = {}
for _, e in ipairs(cap > 0 and plan or {}) do
  for _, j in ipairs(e.j) do
    if not joining[j[1]] and redis.call('HEXISTS', KEYS[2], j[1]) == 0 then
      joining[j[1]] = true
      if tonumber(redis.call('HGET', KEYS[17], j[1]) or '0') >= cap then
        return {'full', j[2]}
      end
    end
  end
end
local seq = tonumber(g[3] or '0')
if ARGV[3] == '0' then seq = tonumber(redis.call('GET', KEYS[16]) or '0') end
local epoch = ARGV[3]
redis.call('HSET', KEYS[6], ARGV[5], ARGV[6])
redis.call('EXPIRE', KEYS[6], ARGV[11])
if ARGV[9] == '1' then
  for _, k in ipairs(redis.call('HKEYS', KEYS[2])) do
    if redis.call('HINCRBY', KEYS[17], k, -1) <= 0 then redis.call('HDEL', KEYS[17], k) end
  end
  local senders = false
  local sent = redis.call('HGETALL', KEYS[13])
  for i = 1, #sent, 2 do
    if tonumber(redis.call('HGET', KEYS[12], sent[i]) or '0') < tonumber(sent[i + 1]) then
      senders = true
    end
  end
  local owed = false
  local former = redis.call('HGETALL', KEYS[3])
  for i = 1, #former, 2 do
    local c = tonumber(redis.call('HGET', KEYS[4], former[i]) or '-1')
    if c < cjson.decode(former[i + 1])[4] then
      owed = true
    elseif not senders then
      redis.call('HDEL', KEYS[3], former[i])
      redis.call('HDEL', KEYS[4], former[i])
    end
  end
  local logged = false
  local left = redis.call('HGETALL', KEYS[2])
  for i = 1, #left, 2 do
    local v = cjson.decode(left[i + 1])
    -- Owed up to their LEFT, like any leaver (audit8 P1, P7): the LEFT
    -- goes into the log, kept until their client has it.
    redis.call('HSET', KEYS[3], left[i], cjson.encode({v[1], v[2], v[3], seq + 1, v[4]}))
    owed = true
    logged = true
  end
  if logged then
    local total = redis.call('HGET', KEYS[1], 'bytes') or '0'
    redis.call('XADD', KEYS[5], (seq + 1) .. '-0', 'm', plan[1].m, 'n', plan[1].n, 's', '',
               'p', total)
    redis.call('HSET', KEYS[1], 'seq', seq + 1)
  end
  if owed then
    for _, k in ipairs(redis.call('HKEYS', KEYS[2])) do
      if redis.call('HEXISTS', KEYS[3], k) == 0 then redis.call('HDEL', KEYS[4], k) end
    end
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'retired', '1')
    redis.call('RENAME', KEYS[1], KEYS[8])
    redis.call('RENAME', KEYS[3], KEYS[9])
    if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('RENAME', KEYS[4], KEYS[10]) end
    if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('RENAME', KEYS[5], KEYS[11]) end
    if redis.call('EXISTS', KEYS[12]) == 1 then redis.call('RENAME', KEYS[12], KEYS[14]) end
    if redis.call('EXISTS', KEYS[13]) == 1 then redis.call('RENAME', KEYS[13], KEYS[15]) end
    redis.call('SADD', KEYS[7], ARGV[12])
  end
  redis.call('SREM', KEYS[7], ARGV[1])
  redis.call('SET', KEYS[16], seq + 1)
  redis.call('PUBLISH', 'chat:all', 'ge\t' .. ARGV[1] .. '\t' .. epoch)
  if owed then
    local last = logged and seq + 1 or seq
    redis.call('PUBLISH', 'chat:all', 'g\t' .. ARGV[12] .. '\t' .. epoch .. '\t' .. last)
  end
  return {'ok', tostring(seq + 1), logged and '1' or '0'}
end
if epoch == '0' then
  epoch = ARGV[10]
  redis.call('HSET', KEYS[1], 'name', ARGV[2], 'epoch', epoch)
  redis.call('SADD', KEYS[7], ARGV[1])
end
local first = seq + 1
local total = redis.call('HGET', KEYS[1], 'bytes') or '0'
for _, e in ipairs(plan) do
  seq = seq + 1
  -- (no text: `p` as `GROUP_POST`'s; `s` empty: no sender's message)
  redis.call('XADD', KEYS[5], seq .. '-0', 'm', e.m, 'n', e.n, 's', '', 'p', total)
  for _, j in ipairs(e.j) do
    -- Added again before they had everything of the earlier membership,
    -- or before every sender was told what they had: it goes on (its
    -- entries stay theirs, the cursor where it was: `GroupTable._join`).
    local ranges = nil
    local earlier = redis.call('HGET', KEYS[3], j[1])
    if earlier then
      local v = cjson.decode(earlier)
      local c = tonumber(redis.call('HGET', KEYS[4], j[1]) or '-1')
      local on = c < v[4]
      if not on then
        local sent = redis.call('HGETALL', KEYS[13])
        for i = 1, #sent, 2 do
          if sent[i] ~= j[1] and tonumber(redis.call('HGET', KEYS[12], sent[i]) or '0') < v[4] then
            on = true
          end
        end
      end
      if on then
        ranges = v[5] or {}
        ranges[#ranges + 1] = {v[2], v[4]}
      end
    end
    if redis.call('HSET', KEYS[2], j[1], cjson.encode({j[2], seq, j[3], ranges})) == 1 then
      redis.call('HINCRBY', KEYS[17], j[1], 1)
    end
    redis.call('HDEL', KEYS[3], j[1])
    if not ranges then redis.call('HSET', KEYS[4], j[1], seq - 1) end
  end
  for _, k in ipairs(e.l) do
    local m = redis.call('HGET', KEYS[2], k)
    if m then
      local v = cjson.decode(m)
      redis.call('HDEL', KEYS[2], k)
      if redis.call('HINCRBY', KEYS[17], k, -1) <= 0 then redis.call('HDEL', KEYS[17], k) end
      redis.call('HSET', KEYS[3], k, cjson.encode({v[1], v[2], v[3], seq, v[4]}))
    end
  end
end
redis.call('HSET', KEYS[1], 'seq', seq, 'changed', seq, 'owner', ARGV[8])
redis.call('HDEL', KEYS[1], 'low', 'lowkey')  -- (one added again may be further behind)
redis.call('PUBLISH', 'chat:all', 'g\t' .. ARGV[1] .. '\t' .. epoch .. '\t' .. seq)
return {'ok', tostring(first)}
"""
# A member's client has the group's entries up to seq. KEYS: cursors,
# members, former. ARGV: member key, seq. Only a member's (or a former
# member's) cursor, and only forward.
GROUP_CURSOR = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 or redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  local c = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
  if tonumber(ARGV[2]) > c then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
end
return 1
"""
# "Delivered by" notices for a sender on another node: to the node its
# route names now, not kept (a lost one is worked out again at the sender's
# next login). KEYS: the sender's route. ARGV: sender key, the notices.
TELL_REACHED = """
local node = redis.call('GET', KEYS[1])
if node then redis.call('PUBLISH', 'chat:node:' .. node, 'gr\t' .. ARGV[1] .. '\t' .. ARGV[2]) end
return 1
"""
# A retired group (one that ended while someone was owed something of it)
# goes with the last former member it kept. KEYS: group, members, former,
# cursors, log, the set of groups, senders' marks, their last messages.
# ARGV (from 2): group key.
END_RETIRED = """
local function end_retired()
  if redis.call('HEXISTS', KEYS[1], 'retired') == 1 and redis.call('HLEN', KEYS[3]) == 0 then
    local epoch = redis.call('HGET', KEYS[1], 'epoch')
    redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[7], KEYS[8])
    redis.call('SREM', KEYS[6], ARGV[2])
    redis.call('PUBLISH', 'chat:all', 'ge\t' .. ARGV[2] .. '\t' .. epoch)
  end
end
"""
# The sender's client was told every delivery of its messages in the group
# up to seq; former members who have all they will get, and of whom every
# sender was told, go then (their nodes' copies may not know the other
# senders' marks: Redis decides). KEYS: as `END_RETIRED`. ARGV: sender
# key, group key, seq.
GROUP_TOLD = (
    END_RETIRED
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local told = tonumber(redis.call('HGET', KEYS[7], ARGV[1]) or '0')
if tonumber(ARGV[3]) <= told then return 0 end
redis.call('HSET', KEYS[7], ARGV[1], ARGV[3])
if redis.call('HLEN', KEYS[3]) == 0 then return 1 end
local marks = {}
local sent = redis.call('HGETALL', KEYS[8])
for i = 1, #sent, 2 do
  local t = tonumber(redis.call('HGET', KEYS[7], sent[i]) or '0')
  if t < tonumber(sent[i + 1]) then marks[sent[i]] = t end
end
local former = redis.call('HGETALL', KEYS[3])
for i = 1, #former, 2 do
  local k = former[i]
  local left = cjson.decode(former[i + 1])[4]
  if tonumber(redis.call('HGET', KEYS[4], k) or '-1') >= left or string.sub(k, 1, 1) == '!' then
    local all = true
    for sender, t in pairs(marks) do
      if sender ~= k and t < left then all = false end
    end
    if all then
      redis.call('HDEL', KEYS[3], k)
      if redis.call('HEXISTS', KEYS[2], k) == 0 then redis.call('HDEL', KEYS[4], k) end
    end
  end
end
end_retired()
return 1
"""
)
# Trim a group's log, as one server does (`Group.trim_plan`,
# `Relay._trim_group`): below the lowest cursor of its members and of its
# former members still owed entries, and the lowest mark of the senders
# still owed "delivered by" notices (a sender's login reads its messages
# past its mark), with XTRIM; and a hole, with XDEL: what lies past the
# entries still owed to each former member behind the current members (up
# to their left_seq) and to each sender still owed notices, up to the
# lowest current member's cursor (each of them has it), is needed by
# nobody. A sender is exempt from the hole up to her `h:` mark in the
# senders' marks (`chat:gtold:`, a field no sender key has, since no name
# has a ':'): her node set it, with nothing of the group in flight to her
# session and nothing queued (review7 F3: one that stopped hearing us keeps
# hers), to where its copy's current members had everything: every
# delivery of her messages up to there was made and told to her client,
# and stays told (it only moves up). Past it she holds the hole to her
# last message, as a sender offline does on one server.
# The group's `holes` are those cut past the trimmed prefix, in order
# ("first:last:bytes;...", runs merged): the hole is worked out whole each
# time, and only what they do not cover is cut (what a sender held while
# her notices were under way, which a later hole went past, goes once she
# is exempt up to it); `hbytes` is the bytes of those past the log's first
# entry, which `GROUP_POST` takes off the log's bytes. A run's bytes are
# two reads of `p` (every seq in it is still in the log; the bytes before a
# hole's first seq are the `p` after it less its bytes). At most `HOLE_MAX`
# entries are cut a call (the next call goes on). Atomic like every script:
# a node killed meanwhile leaves it done or not done. KEYS: members, former
# members, cursors, log, senders' marks, their last messages, the group.
# ARGV: sender key, mark, ... (the caller's senders exempt so far: `h:`
# marks, raised only). Answers {bound, first, last} (first > last: no hole).
TRIM_GROUP = """
local g = redis.call('HMGET', KEYS[7], 'seq', 'bytes', 'holes', 'hbytes')
if not g[1] then return {0, 1, 0} end
local seq, total = tonumber(g[1]), tonumber(g[2] or '0')
for i = 1, #ARGV, 2 do
  local field = 'h:' .. ARGV[i]
  if tonumber(ARGV[i + 1]) > tonumber(redis.call('HGET', KEYS[5], field) or '-1') then
    redis.call('HSET', KEYS[5], field, ARGV[i + 1])
  end
end
local cursors = {}
local flat = redis.call('HGETALL', KEYS[3])
for i = 1, #flat, 2 do cursors[flat[i]] = tonumber(flat[i + 1]) end
local low = seq
for _, key in ipairs(redis.call('HKEYS', KEYS[1])) do
  local c = cursors[key] or 0
  if c < low then low = c end
end
local bound = low
local lefts = {}
local former = redis.call('HGETALL', KEYS[2])
for i = 1, #former, 2 do
  local left = cjson.decode(former[i + 1])[4]
  local c = cursors[former[i]] or -1
  local gone = string.sub(former[i], 1, 1) == '!'
  if c < left then
    if c < bound and not gone then bound = c end
    -- (a deleted account's: kept until every sender was told it never will
    -- have these, which a login tells from the log, whatever her mark says)
    if c < low then lefts[#lefts + 1] = left end
  end
end
local owed = {}
local sent = redis.call('HGETALL', KEYS[6])
for i = 1, #sent, 2 do
  local t = tonumber(redis.call('HGET', KEYS[5], sent[i]) or '0')
  local last = tonumber(sent[i + 1])
  if t < last then
    if t < bound then bound = t end
    if t < low then
      owed[#owed + 1] = {last, tonumber(redis.call('HGET', KEYS[5], 'h:' .. sent[i]) or '-1')}
    end
  end
end
if bound > 0 then redis.call('XTRIM', KEYS[4], 'MINID', (bound + 1) .. '-0') end
local tail = bound
for _, left in ipairs(lefts) do
  if left > tail then tail = left end
end
local moved = true
while moved do  -- a sender not exempt up to the hole holds it past her last message
  moved = false
  for _, o in ipairs(owed) do
    if o[1] > tail and o[2] <= tail then tail, moved = o[1], true end
  end
end
local stop = low
for _, o in ipairs(owed) do  -- one exempt past its start: up to her mark
  if o[1] > tail and o[2] < o[1] and o[2] < stop then stop = o[2] end
end
local first = tail + 1
local function p_at(s)  -- the `p` of the first entry from seq s on
  if s > seq then return total end
  local e = redis.call('XRANGE', KEYS[4], s .. '-0', '+', 'COUNT', 1)
  if #e == 0 then return total end
  local f = e[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'p' then return tonumber(f[i + 1]) end
  end
  return total
end
local holes = {}  -- those cut before, past the prefix trimmed: in order, apart
for a, b, n in string.gmatch(g[3] or '', '(%d+):(%d+):(%d+)') do
  if tonumber(b) > bound then holes[#holes + 1] = {tonumber(a), tonumber(b), tonumber(n)} end
end
local budget, cuts = HOLE_MAX, {}
local function cut(a, b, after)  -- a..b all in the log; `after`: the bytes before b + 1
  if a > b or budget <= 0 then return end
  if b - a + 1 > budget then
    b = a + budget - 1
    after = p_at(b + 1)
  end
  budget = budget - (b - a + 1)
  cuts[#cuts + 1] = {a, b, after - p_at(a)}
  local ids = {}
  for s = a, b do
    ids[#ids + 1] = s .. '-0'
    if #ids == 512 then
      redis.call('XDEL', KEYS[4], unpack(ids))
      ids = {}
    end
  end
  if #ids > 0 then redis.call('XDEL', KEYS[4], unpack(ids)) end
end
-- The hole is first..stop less what earlier holes took (what a sender held
-- then, past which a hole went on, goes once she is exempt up to it). The
-- bytes before a hole's first seq are the `p` after it less its bytes.
local s = first
for _, h in ipairs(holes) do
  if h[1] > stop + 1 then break end
  if h[2] >= s then
    if h[1] > s then cut(s, math.min(h[1] - 1, stop), p_at(h[2] + 1) - h[3]) end
    s = h[2] + 1
  end
end
if s <= stop then cut(s, stop, p_at(stop + 1)) end
for _, c in ipairs(cuts) do holes[#holes + 1] = c end
table.sort(holes, function(x, y) return x[1] < y[1] end)
local runs = {}
for _, h in ipairs(holes) do
  local r = runs[#runs]
  if r and r[2] + 1 >= h[1] then
    if h[2] > r[2] then r[2] = h[2] end
    r[3] = r[3] + h[3]
  else
    runs[#runs + 1] = {h[1], h[2], h[3]}
  end
end
local head = redis.call('XRANGE', KEYS[4], '-', '+', 'COUNT', 1)
local from = #head > 0 and tonumber(string.match(head[1][1], '^(%d+)')) or seq + 1
local text, hbytes = {}, 0
for _, h in ipairs(runs) do
  text[#text + 1] = h[1] .. ':' .. h[2] .. ':' .. h[3]
  if h[1] > from then hbytes = hbytes + h[3] end  -- (a hole is all before it or all after)
end
text = table.concat(text, ';')
if text ~= (g[3] or '') or hbytes ~= tonumber(g[4] or '0') then  -- (no write for nothing)
  redis.call('HSET', KEYS[7], 'holes', text, 'hbytes', hbytes)
end
return {bound, first, stop}
""".replace("HOLE_MAX", str(HOLE_MAX))
# A sender's messages in the log past a seq, at most limit + 1 of them:
# [[entry id, packed entry]...]. KEYS: the log. ARGV: start (exclusive
# "(SEQ-0" or "-"), sender key, limit.
READ_SENT = """
local rows = {}
local start = ARGV[1]
local limit = tonumber(ARGV[3])
while #rows <= limit do
  local chunk = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 512)
  if #chunk == 0 then break end
  for _, e in ipairs(chunk) do
    if e[2][6] == ARGV[2] then
      rows[#rows + 1] = {e[1], e[2][2]}
      if #rows > limit then break end
    end
  end
  start = '(' .. chunk[#chunk][1]
end
return rows
"""
# A former member who has everything meant for them, and of whom every
# sender was told. KEYS: as `END_RETIRED`. ARGV: member key, group key.
GROUP_DROP = (
    END_RETIRED
    + """
if redis.call('HDEL', KEYS[3], ARGV[1]) == 1 and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  redis.call('HDEL', KEYS[4], ARGV[1])
end
end_retired()
return 1
"""
)
# A deleted account's former membership, which it had not had all of:
# kept under its tombstone key (`server_groups.TOMBSTONE`), counted out of
# "of N" for the senders, until every one of them was told (`GROUP_TOLD`).
# KEYS: former, cursors, members. ARGV: member key, tombstone key.
BURY_MEMBER = """
local m = redis.call('HGET', KEYS[1], ARGV[1])
if not m then return 0 end
local c = redis.call('HGET', KEYS[2], ARGV[1]) or '-1'
if tonumber(c) < cjson.decode(m)[4] then
  redis.call('HSET', KEYS[1], ARGV[2], m)
  redis.call('HSET', KEYS[2], ARGV[2], c)
end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then redis.call('HDEL', KEYS[2], ARGV[1]) end
return 1
"""

# Count every user's groups from the members (once per Redis: groups made
# before the counts were kept would otherwise count for nothing, and their
# leaving below zero). KEYS: the counts, the "counted" mark, the set of
# groups. ARGV: the prefix of a group's members' key (`group_keys`).
# (Run once at a node's start, touching every group: one Redis, not a
# Redis Cluster; see docs/CLUSTER.md.)
COUNT_USER_GROUPS = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
for _, g in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local members = ARGV[1] .. '{#' .. g .. '}'
  for _, k in ipairs(redis.call('HKEYS', members)) do redis.call('HINCRBY', KEYS[1], k, 1) end
end
redis.call('SET', KEYS[2], '1')
return 1
"""

SCRIPTS = {
    "store_message": STORE_MESSAGE, "mark_delivered": MARK_DELIVERED, "notice_done": NOTICE_DONE,
    "store_account": STORE_ACCOUNT, "update_account": UPDATE_ACCOUNT,
    "erase_account": ERASE_ACCOUNT, "bind": BIND, "unbind": UNBIND, "renew": RENEW,
    "group_post": GROUP_POST, "change_group": CHANGE_GROUP, "group_cursor": GROUP_CURSOR,
    "tell_reached": TELL_REACHED, "group_told": GROUP_TOLD, "read_sent": READ_SENT,
    "group_drop": GROUP_DROP, "trim_group": TRIM_GROUP, "bury_member": BURY_MEMBER,
}  # fmt: skip


#: The reads this store answers.
READS = (ReadMailbox, ReadNotices, FindDedup, ReadGroupLog, ReadGroupSent, FindGroupItem)


class ClusterError(StoreError):
    """The cluster cannot be joined at start-up (a bad URL, Redis unreachable,
    the redis package missing): one line that says what to do; the server
    prints it and exits with status 2."""


@dataclass(frozen=True)
class ClusterAddress:
    """Where the cluster's Redis is, from `--cluster redis://[USER:PASS@]HOST:PORT[/DB]`."""

    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        """The URL for people and logs: the password never appears."""
        user = ""
        if self.username or self.password:
            user = f"{self.username or ''}{':***' if self.password else ''}@"
        return f"redis://{user}{format_address(self.host, self.port)}/{self.db}"


def parse_cluster_url(text: str) -> ClusterAddress:
    """A `redis://[USER:PASS@]HOST[:PORT][/DB]` URL; a `ClusterError` that
    says what is wrong with anything else (without echoing a password)."""
    shown = text
    try:
        parts = urllib.parse.urlsplit(text)
        if parts.password:
            shown = text.replace(parts.password, "***")
        port = parts.port  # ValueError when not a number or out of range
    except ValueError as exc:
        raise ClusterError(f"--cluster {shown!r}: {exc}; give redis://HOST:PORT[/DB]") from None
    if parts.scheme != "redis":
        raise ClusterError(
            f"--cluster {shown!r} is not a redis:// URL; give redis://HOST:PORT[/DB]"
        )
    if not parts.hostname:
        raise ClusterError(f"--cluster {shown!r} names no host; give redis://HOST:PORT[/DB]")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ClusterError(
            f"--cluster {shown!r}: database {path!r} is not a number; give redis://HOST:PORT/0"
        )
    if parts.query or parts.fragment:
        raise ClusterError(f"--cluster {shown!r}: no ?options or #fragment are taken")
    return ClusterAddress(
        parts.hostname, port or DEFAULT_REDIS_PORT, int(path or 0),
        urllib.parse.unquote(parts.username) if parts.username else None,
        urllib.parse.unquote(parts.password) if parts.password else None,
    )  # fmt: skip


def entry_number(entry: str) -> int:
    """A stream entry id ("ms-seq") as one integer in the stream's order: the
    `server_msg_id` (or receipt seq) the relay and the client see."""
    ms, _, seq = entry.partition("-")
    return (int(ms) << SEQ_BITS) | int(seq)


def entry_id(number: int) -> str:
    """The stream entry id of an `entry_number`."""
    return f"{number >> SEQ_BITS}-{number & ((1 << SEQ_BITS) - 1)}"


def mailbox_key(user_key: str) -> str:
    return f"chat:mbox:{{{user_key}}}"


def notes_key(user_key: str) -> str:
    return f"chat:notes:{{{user_key}}}"


def note_index_key(user_key: str) -> str:
    return f"chat:noteidx:{{{user_key}}}"


def size_key(user_key: str) -> str:
    """Hash of the mailbox's size: n (messages), b (UTF-8 bytes of their text)."""
    return f"chat:msize:{{{user_key}}}"


def route_key(user_key: str) -> str:
    return f"chat:route:{{{user_key}}}"


def dedup_key(sender_key: str, instance_id: int, client_seq: int) -> str:
    return f"chat:dedup:{{{sender_key}}}:{instance_id}:{client_seq}"


#: The set of every group's key (read at a node's start and at each beat).
GROUPS_KEY = "chat:groups"
#: How many groups each user is in (user key -> count; `CHANGE_GROUP`
#: keeps it with the members, and refuses a change past the cap by it).
USER_GROUPS_KEY = "chat:ugroups"
#: Set once `USER_GROUPS_KEY` was counted from the groups' members (a
#: cluster whose groups were made before it was kept: `COUNT_USER_GROUPS`).
USER_GROUPS_COUNTED_KEY = "chat:ugroups:counted"
#: The last seq a group log read may reach (`ReadGroupLog.last` for "all").
LOG_END = 1 << 62


def group_keys(group_key: str) -> dict[str, str]:
    """A group's keys by role, all with the group's hash tag `{#key}`; a
    retired group's ("!KEY!END_ID") keep the tag of the group it was, so a
    script renames one into the other on one shard."""
    tag = f"{{#{group_key}}}"
    if is_retired(group_key):
        base, _, end_id = group_key[1:].partition(TOMBSTONE)
        tag = f"{{#{base}}}{TOMBSTONE}{end_id}"
    return {role: f"chat:{role}:{tag}"
            for role in ("group", "gmem", "gformer", "gcur", "glog", "greq", "gtold",
                         "gsent", "gmark")}  # fmt: skip


def end_keys(keys: dict[str, str]) -> list[str]:
    """A group's keys as `END_RETIRED` (and the scripts built on it) take them."""
    return [keys["group"], keys["gmem"], keys["gformer"], keys["gcur"], keys["glog"], GROUPS_KEY,
            keys["gtold"], keys["gsent"]]  # fmt: skip


def trim_keys(keys: dict[str, str]) -> list[str]:
    """A group's keys as `TRIM_GROUP` takes them."""
    return [keys["gmem"], keys["gformer"], keys["gcur"], keys["glog"], keys["gtold"],
            keys["gsent"], keys["group"]]  # fmt: skip


def group_message_key(server_msg_id: int) -> str:
    """A group message's place ("seq:recipients"), for a SEND sent again."""
    return f"chat:gmsg:{server_msg_id}"


def log_entry_id(seq: int) -> str:
    """The group log's stream entry id of `seq`: the stream's order is the group's."""
    return f"{seq}-0"


def pack_group_item(item: GroupItem) -> str:
    return _pack([item.server_msg_id, item.change, item.sender_key, item.sender,
                  item.instance_id, item.client_seq, item.text, list(item.users),
                  item.sent_ms])  # fmt: skip


def unpack_group_item(group_key: str, entry: str, fields: dict[str, str]) -> GroupItem:
    server_msg_id, change, sender_key, sender, instance_id, client_seq, text, users, sent_ms = (
        json.loads(fields["m"])
    )
    return GroupItem(group_key, int(entry.partition("-")[0]), server_msg_id, change, sender_key,
                     sender, instance_id, client_seq, text, tuple(users), sent_ms,
                     int(fields.get("n", 0)))  # fmt: skip


#: What a group's state is read from (HGETALL each): its hash, members,
#: former members, cursors, senders' marks and last messages.
GROUP_STATE_ROLES = ("group", "gmem", "gformer", "gcur", "gtold", "gsent")


def _ranges(tail: list[Any]) -> tuple[tuple[int, int], ...]:
    """A member's earlier memberships from the optional last element of its
    JSON value (a list of [first, last]; absent, null or {} when none)."""
    if not tail or not isinstance(tail[0], list):
        return ()
    return tuple((int(first), int(last)) for first, last in tail[0])


def _numbers(raw: dict[str, str]) -> dict[str, int]:
    return {key: int(value) for key, value in raw.items()}


def _marks(raw: dict[str, str]) -> dict[str, int]:
    """The senders' marks (`chat:gtold:`) without the holes' `h:` marks
    (`TRIM_GROUP`): no sender key has a ':'."""
    return {key: int(value) for key, value in raw.items() if ":" not in key}


def unpack_group(group_key: str, raw: list[dict[str, str]]) -> LoadedGroup | None:
    """A group from HGETALL of its hash, members, former members and
    cursors (None if it does not exist)."""
    head, current, former, cursors = raw
    if not head.get("epoch"):
        return None
    members: list[LoadedMember] = []
    for key, blob in current.items():
        name, joined, rank, *earlier = json.loads(blob)  # (earlier: see `CHANGE_GROUP`)
        members.append(LoadedMember(key, name, joined, rank, None,
                                    int(cursors.get(key, joined - 1)),
                                    _ranges(earlier)))  # fmt: skip
    for key, blob in former.items():
        name, joined, rank, left, *earlier = json.loads(blob)
        members.append(LoadedMember(key, name, joined, rank, left,
                                    int(cursors.get(key, joined - 1)),
                                    _ranges(earlier)))  # fmt: skip
    members.sort(key=lambda m: (m.joined_seq, m.rank))
    seq = int(head.get("seq", 0))
    return LoadedGroup(group_key, head.get("name", group_key), head.get("owner", ""), seq,
                       members, int(head["epoch"]), int(head.get("changed", 0)))  # fmt: skip


def _pack(values: list[Any]) -> str:
    """A stream entry's values, as its one field `m`."""
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"))


def account_keys(user_key: str) -> list[str]:
    """The keys a registration or a deletion touches (the scripts' KEYS)."""
    return ["chat:accounts", "chat:quarantine", mailbox_key(user_key), size_key(user_key),
            notes_key(user_key), note_index_key(user_key)]  # fmt: skip


def pack_account(account: Account) -> str:
    return json.dumps(
        {"n": account.name, "s": account.salt.hex(), "i": account.iterations,
         "k": account.stored_key.hex(), "v": account.server_key.hex()},
        separators=(",", ":"),
    )  # fmt: skip


def unpack_account(blob: str) -> Account:
    data = json.loads(blob)
    return Account(data["n"], bytes.fromhex(data["s"]), int(data["i"]),
                   bytes.fromhex(data["k"]), bytes.fromhex(data["v"]))  # fmt: skip


class ClusterEvents(Protocol):
    """What the cluster tells the relay (`chat_server.Relay` has these), on
    the loop, as store callbacks."""

    def mail_waiting(self, key: str, server_msg_id: int, now: float) -> None: ...

    def receipts_waiting(self, key: str, seq: int, now: float) -> None: ...

    def resync(self, now: float) -> None: ...

    def logged_in_on(self, key: str, instance_id: int, now: float) -> None: ...

    def presence_elsewhere(self, key: str, online: bool, now: float) -> None: ...

    def account_added(self, key: str, account: Account, now: float) -> None: ...

    def mailbox_size(self, key: str, count: int, size: int, now: float) -> None: ...

    def account_changed(self, key: str, account: Account, now: float) -> None: ...

    def account_erased(self, key: str, until: int, now: float) -> None: ...

    def group_waiting(self, key: str, epoch: int, seq: int, now: float) -> None: ...

    def group_ended(self, key: str, epoch: int, now: float) -> None: ...

    def group_heads(self, heads: dict[str, tuple[int, int]], now: float) -> None: ...

    def group_reached(self, sender_key: str, group_key: str,
                      reached: list[tuple[int, int, list[str]]], cursors: list[tuple[str, int]],
                      now: float) -> None: ...  # fmt: skip


# --- route operations: the router's writes, in the store's one queue --------


@dataclass(slots=True)
class BindRoute:
    """`key` is logged in on this node from client `instance_id`."""

    key: str
    instance_id: int


@dataclass(slots=True)
class UnbindRoute:
    """`key`'s session here ended (its route goes, if it is still this node's)."""

    key: str


@dataclass(slots=True)
class Farewell:
    """The node stops: its routes go now rather than at their TTL."""


ClusterOp = Op | BindRoute | UnbindRoute | Farewell


def open_cluster(
    url: str, node_id: NodeId, notify: Callable[[], None]
) -> tuple[RedisStore, RedisRouter]:
    """A node's store and router on the cluster at `url` (`ClusterError`
    with the one line to print when it cannot be joined)."""
    store = RedisStore(parse_cluster_url(url), node_id, notify=notify)
    try:
        router = RedisRouter(store, store.remote_routes())
    except redis.RedisError as exc:
        store.client.close()
        raise ClusterError(f"cannot read the routes from Redis at {store.address}: {exc}") from None
    return store, router


def _connect(address: ClusterAddress) -> Any:
    """A client that answers `str` (redis-py's types cannot say which)."""
    return redis.Redis(
        host=address.host, port=address.port, db=address.db, username=address.username,
        password=address.password, socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT, decode_responses=True,
        # One immediate retry (a pooled connection that Redis closed when it
        # restarted); beyond that the store's own loop retries, and says so.
        retry=Retry(NoBackoff(), 1),
    )  # fmt: skip


class RedisStore:
    """A `MessageStore` on Redis for one node of a cluster (see the module
    doc). `load` once before the loop; `start` its threads; `attach` the
    relay and the router that its pub/sub notices feed."""

    def __init__(
        self, address: ClusterAddress, node_id: NodeId, *,
        notify: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.address = address
        self.node_id = node_id
        self.notify = notify
        self.clock = clock
        self.client: Any = _connect(address)
        try:
            self.client.ping()
        except redis.AuthenticationError as exc:
            raise ClusterError(
                f"Redis at {address} refused the login ({exc}); check the "
                "user and password in --cluster or CHAT_CLUSTER_URL"
            ) from None
        except redis.RedisError as exc:
            raise ClusterError(f"cannot reach Redis at {address}: {exc}; is redis-server "
                               "running there?") from None  # fmt: skip
        self._sha = {
            name: hashlib.sha1(text.encode()).hexdigest() for name, text in SCRIPTS.items()
        }
        self.events: ClusterEvents | None = None
        self.router: RedisRouter | None = None
        self.done: queue.SimpleQueue[Then] = queue.SimpleQueue()
        self._pending: list[tuple[ClusterOp, Then | None]] = []
        self._ops: queue.SimpleQueue[list[tuple[ClusterOp, Then | None]] | None] = (
            queue.SimpleQueue()
        )
        self._bound: dict[str, None] = {}  # name keys routed here (the store thread's)
        self._block_end = 0
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._pubsub: Any = None
        self._unsupported_seen: set[str] = set()
        self.down_since: float | None = None  # when Redis was lost (None: it answers)
        self._back_at = -RELAPSE_S  # when it last came back
        self._relapse = False  # this outage began right after the last one ended
        self.batches = 0

    def attach(self, events: ClusterEvents, router: RedisRouter) -> None:
        """The relay and the router this node's notices go to. Who is on
        the other nodes already (the router read the routes at start-up) is
        told to the relay at its first pass, as if they logged in now."""
        self.events = events
        self.router = router
        for key in router.remote:
            self.done.put(self._event("presence_elsewhere", key, True))

    # --- start-up (before the loop runs) ------------------------------------

    def load(self) -> Loaded:
        try:
            client = self.client
            client.set("chat:secret", secrets.token_hex(32), nx=True)
            secret = bytes.fromhex(str(client.get("chat:secret")))
            end = int(client.incrby("chat:next_id", ID_BLOCK))
            self._block_end = end + 1
            loaded = Loaded(secret, end - ID_BLOCK + 1)
            for key, blob in client.hgetall("chat:accounts").items():
                loaded.accounts[key] = unpack_account(blob)
            for key, until in client.hgetall("chat:quarantine").items():
                loaded.quarantine[key] = int(until)
            members = group_keys("")["gmem"].removesuffix("{#}")  # (the prefix of every group's)
            client.eval(COUNT_USER_GROUPS, 3, USER_GROUPS_KEY, USER_GROUPS_COUNTED_KEY,
                        GROUPS_KEY, members)  # fmt: skip
            for group, told, sent in self._read_groups(sorted(client.smembers(GROUPS_KEY))):
                loaded.groups.append(group)
                for sender, seq in told.items():
                    loaded.group_told[(sender, group.key)] = seq
                for sender, seq in sent.items():
                    loaded.group_sent[(group.key, sender)] = seq
            self._warn_unless_durable()
            self._load_scripts()
        except redis.RedisError as exc:
            raise ClusterError(f"cannot read the cluster's state from Redis at {self.address}: "
                               f"{exc}") from None  # fmt: skip
        log.info("node %s joined the cluster at %s: %d accounts", self.node_id, self.address,
                 len(loaded.accounts))  # fmt: skip
        return loaded

    def _read_groups(
        self, keys: list[str]
    ) -> list[tuple[LoadedGroup, dict[str, int], dict[str, int]]]:
        """The groups `keys` as Redis holds them (those that still exist),
        each with its senders' marks and last messages (sender key -> seq)."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            names = group_keys(key)
            for role in GROUP_STATE_ROLES:
                pipe.hgetall(names[role])
        raw = pipe.execute() if keys else []
        step = len(GROUP_STATE_ROLES)
        found = []
        for i, key in enumerate(keys):
            state = raw[step * i : step * (i + 1)]
            group = unpack_group(key, state[:4])
            if group is not None:
                found.append((group, _marks(state[4]), _numbers(state[5])))
        return found

    def remote_routes(self) -> dict[str, NodeId]:
        """Start-up: who is logged in on the other nodes (a SCAN of the routes)."""
        routes: dict[str, NodeId] = {}
        keys = list(self.client.scan_iter("chat:route:*", count=1000))
        for part in range(0, len(keys), 1000):
            chunk = keys[part : part + 1000]
            for key, node in zip(chunk, self.client.mget(chunk), strict=True):
                if node is not None and node != self.node_id:
                    routes[key[len("chat:route:{") : -1]] = node
        return routes

    def _warn_unless_durable(self) -> None:
        """An ACCEPT means durable only with AOF and `appendfsync always`."""
        try:
            config = self.client.config_get("append*")
        except redis.ResponseError:
            return  # CONFIG is disabled (a managed Redis): it cannot be checked
        if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
            log.warning("Redis at %s runs with appendonly=%s appendfsync=%s: a Redis crash may "
                        "lose accepted messages; run it with --appendonly yes --appendfsync "
                        "always", self.address, config.get("appendonly"),
                        config.get("appendfsync"))  # fmt: skip

    def start(self) -> None:
        """Subscribe (before any user is served, so no notice is missed) and
        start the store and listener threads."""
        self._pubsub = self._subscribe()
        self._thread = threading.Thread(target=self._run, name="chat-redis", daemon=True)
        self._thread.start()
        self._listener = threading.Thread(target=self._listen, name="chat-redis-sub", daemon=True)
        self._listener.start()

    # --- the loop's side ------------------------------------------------------

    def submit(self, op: Op, then: Then | None = None) -> None:
        self._pending.append((op, then))

    def submit_route(self, op: BindRoute | UnbindRoute) -> None:
        """The router's writes, in order with the relay's (a login's route is
        written before its first mailbox read, so no notice is missed)."""
        self._pending.append((op, None))

    def reserve_ids(self, next_msg_id: int) -> int:
        # One block per start (`ID_BLOCK`): this is reached after 2**40 ids.
        if next_msg_id >= self._block_end:
            raise RuntimeError("this node gave out its whole block of 2**40 message ids; "
                               "restart it to reserve another")  # fmt: skip
        return self._block_end

    def completed(self) -> list[Then]:
        done: list[Then] = []
        while True:
            try:
                done.append(self.done.get_nowait())
            except queue.Empty:
                return done

    def flush(self) -> None:
        if self._pending:
            self._ops.put(self._pending)
            self._pending = []

    def close(self) -> None:
        """Apply what is queued, remove this node's routes, stop the threads."""
        self.flush()
        if self._thread is not None:
            self._ops.put([(Farewell(), None)])
            self._closing.set()
            self._ops.put(None)
            self._thread.join(SOCKET_TIMEOUT + 5)
            self._thread = None
        if self._listener is not None:
            self._listener.join(5)
            self._listener = None
        with contextlib.suppress(Exception):
            if self._pubsub is not None:
                self._pubsub.close()
        self.client.close()

    # --- the store thread -----------------------------------------------------

    def _run(self) -> None:
        renew_due = self.clock() + ROUTE_RENEW
        stopping = False
        while not stopping:
            try:
                first = self._ops.get(timeout=max(0.0, renew_due - self.clock()))
            except queue.Empty:
                first = []
            if first is None:
                break
            batch = list(first)
            while len(batch) < MAX_BATCH:
                try:
                    more = self._ops.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.extend(more)
            renew = self.clock() >= renew_due
            callbacks = self._until_applied(batch, renew)
            if callbacks is None:
                return  # closed while Redis was away
            if renew:
                renew_due = self.clock() + ROUTE_RENEW
            for then in callbacks:
                self.done.put(then)
            if callbacks:
                self.notify()

    def _until_applied(
        self, batch: list[tuple[ClusterOp, Then | None]], renew: bool
    ) -> list[Then] | None:
        """Apply the batch, again and again while Redis cannot be reached
        (nothing of it is acknowledged meanwhile); None if the store closed
        first."""
        while True:
            try:
                callbacks = self._apply(batch)
                if renew or self.down_since is not None:
                    # Back after an outage: routes may have expired meanwhile,
                    # and a message stored for a user without one woke nobody.
                    # Renew now, then have every session read its queues.
                    callbacks += self._renew()
                    if self.down_since is not None:
                        callbacks.append(self._event("resync"))
            except redis.exceptions.NoScriptError:
                # Redis restarted (its script cache is empty): load them and
                # apply the batch again (every script is idempotent).
                with contextlib.suppress(redis.RedisError):
                    self._load_scripts()
                    continue
            except redis.RedisError as exc:
                now = self.clock()
                if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                    # Every pooled connection may be dead alike (Redis restarted,
                    # the link was cut): the next attempt opens fresh ones.
                    with contextlib.suppress(Exception):
                        self.client.connection_pool.disconnect()
                if self.down_since is None:
                    self.down_since = now
                    # A link that fails again right after it came back (a
                    # flapping link, stale sockets) is the same outage: its
                    # lines go to the debug log, not a second pair of lines.
                    self._relapse = now < self._back_at + RELAPSE_S
                    if self._relapse:
                        log.debug("Redis at %s lost again right after it came back (%s)",
                                  self.address, exc)  # fmt: skip
                    elif isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                        log.error("lost Redis at %s (%s): messages are not acknowledged until "
                                  "it is back; retrying every %g s", self.address, exc,
                                  RETRY_S)  # fmt: skip
                    else:
                        log.exception("Redis at %s refused a batch; retrying every %g s",
                                      self.address, RETRY_S)  # fmt: skip
            else:
                if self.down_since is not None:
                    now = self.clock()
                    log.log(logging.DEBUG if self._relapse else logging.WARNING,
                            "Redis at %s is back after %.1f s: acknowledging again",
                            self.address, now - self.down_since)  # fmt: skip
                    self.down_since = None
                    self._back_at = now
                return callbacks
            if self._closing.wait(RETRY_S):
                log.error("node stopped with %d operations not applied (none of them was "
                          "acknowledged)", len(batch))  # fmt: skip
                return None

    def _load_scripts(self) -> None:
        for text in SCRIPTS.values():
            self.client.script_load(text)

    def _script(self, pipe: Any, name: str, keys: list[str], args: list[Any]) -> None:
        """Queue script `name` by its SHA1 (one round trip per batch; a
        NOSCRIPT after a Redis restart loads them and applies the batch again)."""
        pipe.evalsha(self._sha[name], len(keys), *keys, *args)

    def _apply(self, batch: list[tuple[ClusterOp, Then | None]]) -> list[Then]:
        """One MULTI/EXEC for the batch's writes, then one pipeline of its
        reads (which see them). Returns the callbacks to run, in order."""
        pipe = self.client.pipeline(transaction=True)
        script = functools.partial(self._script, pipe)
        accounts: list[tuple[int, StoreAccount, str]] = []
        sizes: list[tuple[int, str]] = []  # (result index, user key) of mailbox sizes
        skipped: set[int] = set()  # operations it cannot apply
        numbered: list[tuple[int, PostGroupMessage | ChangeGroup]] = []  # (result index, op)
        writes = 0
        for op, _ in batch:
            match op:
                case PostGroupMessage() | ChangeGroup():
                    numbered.append((writes, op))
                    self._queue_group(script, op)
                case GroupReceipt() | GroupTold() | DropMember() | BuryMember() | TellReached():
                    self._queue_group(script, op)
                case TrimGroup(group_key, _, _, exempt):
                    # (the upto and first of one server's are worked out in Redis)
                    script("trim_group", trim_keys(group_keys(group_key)),
                           [value for pair in exempt for value in pair])  # fmt: skip
                case ReadGroupState() | ReadGroupCursors():
                    continue  # reads, below
                case StoreMessage(m):
                    digest = content_digest(m.recipient_key, m.text).hex()
                    sizes.append((writes, m.recipient_key))
                    script(
                        "store_message",
                        [dedup_key(m.sender_key, m.instance_id, m.client_seq),
                         mailbox_key(m.recipient_key), route_key(m.recipient_key),
                         size_key(m.recipient_key)],
                        [f"{m.server_msg_id}:{digest}", DEDUP_KEEP_S, m.recipient_key,
                         len(m.text.encode("utf-8")),
                         _pack([m.sender_key, m.sender, m.instance_id, m.client_seq, m.text,
                                m.sent_ms])],
                    )  # fmt: skip
                case MarkDelivered():
                    sizes.append((writes, op.recipient_key))
                    self._queue_mark(script, op)
                case MarkDelivereds(items):
                    for mark in items:  # one script each, in the same MULTI
                        sizes.append((writes, mark.recipient_key))
                        self._queue_mark(script, mark)
                        writes += 1
                    continue
                case NoticeDone(sender_key, instance_id, client_seq):
                    script("notice_done", [notes_key(sender_key), note_index_key(sender_key)],
                           [f"{instance_id}:{client_seq}"])  # fmt: skip
                case StoreAccount(key, account):
                    blob = pack_account(account)
                    script("store_account", account_keys(key), [key, blob])
                    accounts.append((writes, op, blob))
                case UpdateAccount(key, account):
                    script("update_account", ["chat:accounts"], [key, pack_account(account)])
                case EraseAccount(key, until_ms):
                    script("erase_account", account_keys(key), [key, until_ms])
                case BindRoute(key, instance_id):
                    self._bound[key] = None
                    script("bind", [route_key(key)], [self.node_id, ROUTE_TTL, key, instance_id])
                case UnbindRoute(key):
                    self._bound.pop(key, None)
                    script("unbind", [route_key(key)], [self.node_id, key])
                case Farewell():
                    for key in self._bound:
                        script("unbind", [route_key(key)], [self.node_id, key])
                        writes += 1
                    self._bound.clear()
                    continue
                case Reserve() | Sync() | Read():
                    continue  # ids come in one block per start; a barrier; reads below
                case _:
                    # An operation this store does not know (a feature built for
                    # the single server only): never applied, so never acknowledged.
                    self._unsupported(op)
                    skipped.add(id(op))
                    continue
            writes += 1
        results: list[Any] = pipe.execute() if writes else []
        for at, numbered_op in numbered:
            self._group_outcome(numbered_op, results[at])
        # A registration that lost a race with another node's: the account
        # stored first holds, and the relay is told instead of its callback.
        lost = {id(op): unpack_account(results[at]) for at, op, blob in accounts
                if results[at] != blob}  # fmt: skip
        # Reads after the writes, each seeing every write submitted before it.
        reads = [op for op, _ in batch if isinstance(op, Read)]
        for read in reads:
            if not isinstance(read.query, READS):
                self._unsupported(read.query)  # left not ok: the relay asks again later
        reads = [read for read in reads if isinstance(read.query, READS)]
        group_reads = [op for op, _ in batch if isinstance(op, ReadGroupState | ReadGroupCursors)]
        if reads or group_reads:
            pipe = self.client.pipeline(transaction=False)
            for read in reads:
                self._queue_read(pipe, read.query)
            for group_read in group_reads:
                self._queue_group_read(pipe, group_read)
            answers = pipe.execute()
            for read, raw in zip(reads, answers, strict=False):
                read.result = self._answer(read.query, raw)
                read.ok = True
            at = len(reads)
            for group_read in group_reads:
                at = self._group_answer(group_read, answers, at)
        self.batches += 1
        callbacks: list[Then] = []
        for op, then in batch:
            if id(op) in skipped:
                continue
            if isinstance(op, StoreAccount) and id(op) in lost:
                callbacks.append(self._event("account_added", op.key, lost[id(op)]))
            elif then is not None:
                callbacks.append(then)
        # The mailbox caps go by the shared sizes, as of the last write here.
        latest = {key: results[at] for at, key in sizes}
        for key, size in latest.items():
            count, _, utf8 = str(size).partition(":")
            callbacks.append(self._event("mailbox_size", key, int(count), int(utf8)))
        return callbacks

    @staticmethod
    def _queue_mark(script: Callable[[str, list[str], list[Any]], None],
                    op: MarkDelivered) -> None:  # fmt: skip
        """Queue a receipt's script: the message out of its recipient's
        mailbox, its sender's receipt queued unless `told`."""
        script(
            "mark_delivered",
            [mailbox_key(op.recipient_key), notes_key(op.sender_key),
             note_index_key(op.sender_key), route_key(op.sender_key),
             size_key(op.recipient_key)],
            [entry_id(op.server_msg_id), f"{op.instance_id}:{op.client_seq}",
             op.sender_key, _pack([op.instance_id, op.client_seq, op.recipient]),
             op.size, "1" if op.told else "0"],
        )  # fmt: skip

    # --- groups (see the scripts' comments) -------------------------------------

    def _queue_group(
        self, script: Callable[[str, list[str], list[Any]], None],
        op: PostGroupMessage | ChangeGroup | GroupReceipt | GroupTold | DropMember | BuryMember
        | TellReached,
    ) -> None:  # fmt: skip
        """Queue a group write's script (one command in the MULTI)."""
        match op:
            case PostGroupMessage(item):
                keys = group_keys(item.group_key)
                digest = content_digest(GROUP_DEDUP_PREFIX + item.group_key, item.text).hex()
                script("group_post",
                       [dedup_key(item.sender_key, item.instance_id, item.client_seq),
                        keys["group"], keys["gmem"], keys["glog"],
                        group_message_key(item.server_msg_id), keys["gsent"], keys["gcur"],
                        keys["gtold"]],
                       [f"{item.server_msg_id}:{digest}", DEDUP_KEEP_S, item.sender_key,
                        pack_group_item(item), item.group_key, len(item.text.encode("utf-8")),
                        op.max_entries or UNBOUNDED, op.max_bytes or UNBOUNDED])  # fmt: skip
            case ChangeGroup():
                keys = group_keys(op.group_key)
                (user_key, instance_id, request_id), code, text = op.request
                plan = [{"m": pack_group_item(item), "n": item.recipients,
                         "j": [list(j) for j in joined], "l": list(left)}
                        for item, joined, left in op.entries]  # fmt: skip
                first_id = op.entries[0][0].server_msg_id if op.entries else 0
                retired = retired_key(op.group_key, first_id)  # (used if it ends owing)
                kept = group_keys(retired)
                script("change_group",
                       [keys["group"], keys["gmem"], keys["gformer"], keys["gcur"], keys["glog"],
                        keys["greq"], GROUPS_KEY, kept["group"], kept["gformer"], kept["gcur"],
                        kept["glog"], keys["gtold"], keys["gsent"], kept["gtold"],
                        kept["gsent"], keys["gmark"], USER_GROUPS_KEY],
                       [op.group_key, op.name, op.epoch, op.changed,
                        f"{user_key}:{instance_id}:{request_id}", _pack([code, text]),
                        _pack(plan), op.owner_key, int(op.end), first_id, DEDUP_KEEP_S,
                        retired, op.max_user_groups])  # fmt: skip
            case GroupReceipt(group_key, member_key, seq):
                keys = group_keys(group_key)
                script("group_cursor", [keys["gcur"], keys["gmem"], keys["gformer"]],
                       [member_key, seq])  # fmt: skip
            case GroupTold(sender_key, group_key, seq):
                script("group_told", end_keys(group_keys(group_key)), [sender_key, group_key, seq])
            case DropMember(group_key, member_key):
                script("group_drop", end_keys(group_keys(group_key)), [member_key, group_key])
            case BuryMember(group_key, member_key, tomb_key):
                keys = group_keys(group_key)
                script("bury_member", [keys["gformer"], keys["gcur"], keys["gmem"]],
                       [member_key, tomb_key])  # fmt: skip
            case TellReached(sender_key, group_key, reached, cursors):
                script("tell_reached", [route_key(sender_key)],
                       [sender_key, _pack([group_key, reached, cursors])])  # fmt: skip

    @staticmethod
    def _group_outcome(op: PostGroupMessage | ChangeGroup, raw: list[Any]) -> None:
        """What the store said of a numbered group write, on the operation."""
        outcome = str(raw[0])
        if isinstance(op, PostGroupMessage):
            if outcome in ("ok", "dup"):
                parts = str(raw[1]).split(":")
                if outcome == "dup":
                    # Stored before (a batch applied again, or a SEND that reached
                    # two nodes): the entry as it was stored, under its own id.
                    if len(parts) != 5:  # the id was used for a direct message
                        op.refused = int(ErrorCode.DUPLICATE_ID)
                        return
                    op.item.server_msg_id = int(parts[0])
                    parts = parts[2:]
                op.item.group_seq, op.item.recipients, op.epoch = map(int, parts)
            elif outcome == "full":
                op.refused = int(ErrorCode.MAILBOX_FULL)
                count, waiting = str(raw[2]).split(":")
                op.held_by, op.backlog = str(raw[1]), (int(count), int(waiting))
            else:
                op.refused = int(ErrorCode.NO_SUCH_GROUP if outcome == "nogroup"
                                 else ErrorCode.NOT_A_MEMBER)  # fmt: skip
            return
        op.outcome = outcome
        if outcome == "ok":
            op.first_seq = int(raw[1])
            op.logged = len(raw) > 2 and str(raw[2]) == "1"
        elif outcome == "full":
            op.full = str(raw[1])
        elif outcome in ("conflict", "none"):
            op.current = (int(raw[1]), int(raw[2]))
        elif outcome == "done":
            code, text = json.loads(raw[1])
            op.answer = (int(code), str(text))

    @staticmethod
    def _queue_group_read(pipe: Any, op: ReadGroupState | ReadGroupCursors) -> None:
        if isinstance(op, ReadGroupState):
            keys = group_keys(op.group_key)
            for role in GROUP_STATE_ROLES:
                pipe.hgetall(keys[role])
        else:
            for key in op.group_keys:
                pipe.hget(group_keys(key)["gcur"], op.member_key)

    @staticmethod
    def _group_answer(op: ReadGroupState | ReadGroupCursors, answers: list[Any], at: int) -> int:
        """Fill in a group read's answer from the pipeline's, from index `at`;
        answers the index after it."""
        if isinstance(op, ReadGroupState):
            raw = answers[at : at + len(GROUP_STATE_ROLES)]
            op.result = unpack_group(op.group_key, raw[:4])
            op.told, op.sent = _marks(raw[4]), _numbers(raw[5])
            op.ok = True
            return at + len(GROUP_STATE_ROLES)
        for key, cursor in zip(op.group_keys, answers[at : at + len(op.group_keys)], strict=True):
            if cursor is not None:
                op.result[key] = int(cursor)
        op.ok = True
        return at + len(op.group_keys)

    def _unsupported(self, op: object) -> None:
        kind = type(op).__name__
        if kind not in self._unsupported_seen:
            self._unsupported_seen.add(kind)
            log.error("%s is not supported in cluster mode: not applied and not acknowledged "
                      "(logged once)", kind)  # fmt: skip

    def _queue_read(self, pipe: Any, query: Query) -> None:
        match query:
            case ReadMailbox(key, after, limit, _):
                start = "-" if after < 0 else f"({entry_id(after)}"
                pipe.xrange(mailbox_key(key), start, "+", count=limit)
            case ReadNotices(key, after, limit):
                start = "-" if after < 0 else f"({entry_id(after)}"
                pipe.xrange(notes_key(key), start, "+", count=limit)
            case FindDedup(key, instance_id, client_seq):
                pipe.get(dedup_key(key, instance_id, client_seq))
            case ReadGroupLog(key, after, last, limit, _):
                start = "-" if after < 0 else f"({log_entry_id(after)}"
                end = "+" if last >= LOG_END else log_entry_id(last)
                pipe.xrange(group_keys(key)["glog"], start, end, count=limit)
            case ReadGroupSent(key, sender_key, after, limit):
                start = "-" if after < 0 else f"({log_entry_id(after)}"
                pipe.evalsha(self._sha["read_sent"], 1, group_keys(key)["glog"], start, sender_key,
                             limit)  # fmt: skip
            case FindGroupItem(server_msg_id):
                pipe.get(group_message_key(server_msg_id))

    @staticmethod
    def _answer(query: Query, raw: Any) -> Answer:
        """A read's answer, from what Redis said to `_queue_read`'s command."""
        match query:
            case ReadMailbox(key, _, limit, max_bytes):
                rows: list[StoredMessage] = []
                size = 0
                for entry, fields in raw:
                    sender_key, sender, instance_id, client_seq, text, sent_ms = json.loads(
                        fields["m"]
                    )
                    message = StoredMessage(entry_number(entry), key, sender_key, sender,
                                            instance_id, client_seq, text, sent_ms)  # fmt: skip
                    size += len(message.text.encode("utf-8"))
                    if rows and size > max_bytes:
                        return rows, True
                    rows.append(message)
                return rows, len(raw) >= limit
            case ReadNotices(_, _, limit):
                notes = [(entry_number(e), *json.loads(fields["m"])) for e, fields in raw]
                return notes, len(raw) >= limit
            case FindDedup():
                if raw is None:
                    return None
                # (a group message's goes on with its place: ":seq:recipients:epoch")
                server_msg_id, digest = str(raw).split(":")[:2]
                return int(server_msg_id), bytes.fromhex(digest), None
            case ReadGroupLog(key, _, _, limit, max_bytes):
                items: list[GroupItem] = []
                size = 0
                for entry, fields in raw:
                    item = unpack_group_item(key, entry, fields)
                    size += len(item.text.encode("utf-8"))
                    if items and size > max_bytes:
                        return items, True
                    items.append(item)
                return items, len(raw) >= limit
            case ReadGroupSent(_, _, _, limit):
                sent: list[tuple[int, int, int]] = []
                for entry, packed in raw:
                    values = json.loads(packed)  # (as `pack_group_item`)
                    sent.append((int(str(entry).partition("-")[0]), int(values[4]),
                                 int(values[5])))  # fmt: skip
                return sent[:limit], len(sent) > limit
            case FindGroupItem():
                if raw is None:
                    return None
                seq, _, recipients = str(raw).partition(":")
                return int(seq), int(recipients)
        return None  # not one of `READS`: never asked (`_apply` leaves it not ok)

    def _renew(self) -> list[Then]:
        """Keep this node's routes alive and say the node is. A route that
        another node holds means a login there whose notice was missed (the
        pub/sub link was down): the session here is taken over."""
        keys = [route_key(key) for key in self._bound]
        pipe = self.client.pipeline(transaction=False)
        for part in range(0, len(keys), RENEW_CHUNK):
            self._script(pipe, "renew", keys[part : part + RENEW_CHUNK], [self.node_id, ROUTE_TTL])
        pipe.publish(BROADCAST, f"alive\t{self.node_id}")
        taken = [key for answer in pipe.execute()[:-1] for key in answer]
        callbacks: list[Then] = [self._event("group_heads", self._group_heads(trim=True))]
        for route in taken:
            user_key = route[len("chat:route:{") : -1]
            self._bound.pop(user_key, None)
            # Another client (an unknown instance): its BYE says logged_in_elsewhere.
            callbacks.append(self._event("logged_in_on", user_key, -1))
        return callbacks

    def _group_heads(self, *, trim: bool = False) -> dict[str, tuple[int, int]]:
        """Every group's (epoch, last seq): a node that missed a group's
        notices (pub/sub is not kept) catches up from here at its next beat.
        With `trim`, each group's log is trimmed too (`TRIM_GROUP`)."""
        keys = sorted(self.client.smembers(GROUPS_KEY))
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            names = group_keys(key)
            pipe.hmget(names["group"], "epoch", "seq")
            if trim:
                self._script(pipe, "trim_group", trim_keys(names), [])
        answers = pipe.execute() if keys else []
        step = 2 if trim else 1
        heads: dict[str, tuple[int, int]] = {}
        for key, (epoch, seq) in zip(keys, answers[::step], strict=True):
            if epoch is not None:
                heads[key] = (int(epoch), int(seq or 0))
        return heads

    # --- the listener thread: pub/sub notices to the loop ---------------------

    def _subscribe(self) -> Any:
        pubsub: Any = self.client.pubsub()
        pubsub.subscribe(NODE_CHANNEL + self.node_id, BROADCAST)
        confirmed = 0
        deadline = time.monotonic() + SOCKET_TIMEOUT
        while confirmed < 2:
            message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message is None:
                if time.monotonic() >= deadline:
                    raise redis.TimeoutError("no answer to SUBSCRIBE")
                continue
            if message["type"] == "subscribe":
                confirmed += 1
        return pubsub

    def _listen(self) -> None:
        pubsub = self._pubsub
        while not self._closing.is_set():
            try:
                if pubsub is None:
                    pubsub = self._pubsub = self._subscribe()
                    # Notices may have been missed while the link was down.
                    self._catch_up()
                message = pubsub.get_message(timeout=0.5)
                if message is None:
                    continue
                # Take what else has come too, and wake the loop once for all
                # of it: under load a notice per message would be a wake-up
                # (a system call and a loop pass) per message.
                notices: list[str] = []
                while message is not None and len(notices) < NOTICE_BATCH:
                    if message["type"] == "message":
                        notices.append(str(message["data"]))
                    message = pubsub.get_message(timeout=0)
                if notices:
                    self._on_notices(notices)
            except redis.RedisError as exc:
                log.debug("pub/sub link to Redis lost (%s); subscribing again", exc)
                with contextlib.suppress(Exception):
                    if pubsub is not None:
                        pubsub.close()
                pubsub = self._pubsub = None
                self._closing.wait(RETRY_S)
            except Exception:  # a notice we cannot read: never the end of the thread
                log.exception("cannot handle a cluster notice")

    def _catch_up(self) -> None:
        """After the pub/sub link came back: accounts registered meanwhile,
        and every local session's queues read again."""
        for key, blob in self.client.hgetall("chat:accounts").items():
            self.done.put(self._event("account_added", key, unpack_account(blob)))
        for key, until in self.client.hgetall("chat:quarantine").items():
            self.done.put(self._event("account_erased", key, int(until)))
        self.done.put(self._event("resync"))
        self.done.put(self._event("group_heads", self._group_heads()))
        self.notify()

    def _on_notices(self, notices: list[str]) -> None:
        """Hand a burst of notices to the loop. Of the "something waits"
        notices only the newest per user and queue is kept: a page read for
        it reads everything older as well."""
        waiting: dict[tuple[str, str], int] = {}
        groups: dict[tuple[str, int], int] = {}  # (group key, epoch) -> the highest seq
        for data in notices:
            kind, _, rest = data.partition("\t")
            if kind in ("m", "n"):
                key, _, entry = rest.rpartition("\t")
                number = entry_number(entry)
                if number > waiting.get((kind, key), -1):
                    waiting[(kind, key)] = number
            elif kind == "g":
                key, epoch_text, seq_text = rest.split("\t")
                place = (key, int(epoch_text))
                groups[place] = max(groups.get(place, 0), int(seq_text))
            else:
                self._on_notice(kind, rest)
        names = {"m": "mail_waiting", "n": "receipts_waiting"}
        for (kind, key), number in waiting.items():
            self.done.put(self._event(names[kind], key, number))
        for (key, epoch), last in groups.items():
            self.done.put(self._event("group_waiting", key, epoch, last))
        self.notify()

    def _on_notice(self, kind: str, rest: str) -> None:
        match kind:
            case "a":
                key, _, blob = rest.partition("\t")
                self.done.put(self._event("account_added", key, unpack_account(blob)))
            case "u":
                key, _, blob = rest.partition("\t")
                self.done.put(self._event("account_changed", key, unpack_account(blob)))
            case "x":
                key, _, until = rest.partition("\t")
                self.done.put(self._event("account_erased", key, int(until)))
            case "on":
                key, node, instance = rest.split("\t")
                if node != self.node_id:
                    self.done.put(self._routed(key, node, int(instance)))
            case "off":
                key, node = rest.split("\t")
                if node != self.node_id:
                    self.done.put(self._routed(key, node, None))
            case "ge":
                key, _, epoch = rest.partition("\t")
                self.done.put(self._event("group_ended", key, int(epoch)))
            case "gr":
                key, _, blob = rest.partition("\t")
                group_key, reached, cursors = json.loads(blob)
                self.done.put(self._event(
                    "group_reached", key, group_key,
                    [(int(i), int(c), [str(n) for n in names]) for i, c, names in reached],
                    [(str(k), int(seq)) for k, seq in cursors]))  # fmt: skip
            case "alive":  # this node's own beat too: it times the others out
                self.done.put(self._alive(rest))
            case _:
                log.debug("unknown cluster notice %r", kind)

    def _event(self, name: str, *args: Any) -> Then:
        """A call of `ClusterEvents.<name>(*args, now)` for the loop."""

        def call() -> None:
            if self.events is not None:
                getattr(self.events, name)(*args, self.clock())

        return call

    def _routed(self, key: str, node: NodeId, instance_id: int | None) -> Then:
        """A login (`instance_id` given) or logout on another node."""

        def call() -> None:
            events, router = self.events, self.router
            if events is None or router is None:
                return
            now = self.clock()
            if instance_id is not None:
                events.logged_in_on(key, instance_id, now)  # ends a session of theirs here
                router.remote_bound(key, node, now)
                events.presence_elsewhere(key, True, now)
            elif router.remote_unbound(key, node):
                events.presence_elsewhere(key, False, now)

        return call

    def _alive(self, node: NodeId) -> Then:
        def call() -> None:
            events, router = self.events, self.router
            if events is None or router is None:
                return
            now = self.clock()
            for key in router.node_alive(node, now):
                events.presence_elsewhere(key, False, now)

        return call


class RedisRouter:
    """A `Router` for a cluster node: its own sessions (`User.session`) and a
    cache of the routes to other nodes, kept by the pub/sub notices (a login
    or logout elsewhere) and dropped with a node that has gone silent for
    `ROUTE_TTL`. Writes go through the store's queue (`BindRoute`,
    `UnbindRoute`); `locate` answers from memory."""

    def __init__(self, store: RedisStore, remote: dict[str, NodeId] | None = None) -> None:
        self.store = store
        self.node_id = store.node_id
        self.remote: dict[str, NodeId] = dict(remote or {})
        self.nodes_seen: dict[NodeId, float] = {}

    def locate(self, user: User) -> Route:
        session = user.session
        if session is not None:
            return session
        return self.remote.get(user.key)

    def bind(self, user: User, session: Session, now: float) -> None:
        user.session = session
        self.remote.pop(user.key, None)
        self.store.submit_route(BindRoute(user.key, session.instance_id))

    def unbind(self, user: User, session: Session, now: float) -> None:
        if user.session is session:
            user.session = None
            self.store.submit_route(UnbindRoute(user.key))

    def remote_bound(self, key: str, node: NodeId, now: float) -> None:
        self.remote[key] = node
        self.nodes_seen.setdefault(node, now)

    def remote_unbound(self, key: str, node: NodeId) -> bool:
        """A logout on `node`: True if that was the route known here."""
        if self.remote.get(key) == node:
            del self.remote[key]
            return True
        return False

    def node_alive(self, node: NodeId, now: float) -> list[str]:
        """`node` said it is alive; answers the users of nodes silent for
        longer than a route lives, whose routes are dropped here."""
        if node != self.node_id:
            self.nodes_seen[node] = now
        gone = {n for n, seen in self.nodes_seen.items() if now - seen > ROUTE_TTL}
        if not gone:
            return []
        for n in gone:
            del self.nodes_seen[n]
            log.warning("node %s has been silent for over %d s: its users count as offline",
                        n, ROUTE_TTL)  # fmt: skip
        keys = [key for key, n in self.remote.items() if n in gone]
        for key in keys:
            del self.remote[key]
        return keys
