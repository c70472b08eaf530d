#!/usr/bin/env python3
"""Checks run by KeelServerTests against a real `keel serve`, with redis-py and raw sockets.

usage:
  redis_client_checks.py basic PORT PROTOCOL        commands and replies through redis-py (RESP2 or RESP3)
  redis_client_checks.py malformed PORT             protocol errors on raw sockets
  redis_client_checks.py auth PORT PASSWORD         requirepass
  redis_client_checks.py writer PORT...             SET w:<i> <i> in order through any port; prints i once acknowledged
  redis_client_checks.py writer-limit N PORT...     the same for N writes
  redis_client_checks.py verify FILE PORT...        every acknowledged key (numbers in FILE) is present, read linearizably
  redis_client_checks.py http PORT HTTPPORT         /health, /metrics (Prometheus text format), the status page, 404
  redis_client_checks.py transaction-limits PORT    MULTI and WATCH past one log entry's size are refused
  redis_client_checks.py slow-reader PORT           a client that pipelines large GETs and MGETs and reads nothing costs bounded memory, and gets every reply, in order
  redis_client_checks.py concurrent-reads PORT      many connections reading at once (one turn's reads run together): each sees its own writes, in order
  redis_client_checks.py concurrent-writes PORT     many connections writing at once (one turn's single writes share a log entry): each gets its own replies
Exits 0 when every check passes; prints the failing check and exits 1 otherwise.
"""
import os
import random
import socket
import sys
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def check(condition, what):
    if not condition:
        print("FAILED:", what, flush=True)
        sys.exit(1)


def basic(port, protocol):
    r = redis.Redis(port=port, protocol=protocol, decode_responses=True)
    r.flushall()
    check(r.ping() is True, "PING")
    check(r.set("greeting", "hello") is True, "SET")
    check(r.get("greeting") == "hello", "GET")
    check(r.set("greeting", "x", nx=True) is None, "SET NX on an existing key")
    check(r.set("counter", 10) and r.incr("counter") == 11 and r.decrby("counter", 5) == 6, "INCR/DECRBY")
    check(r.incrbyfloat("float", 2.5) == 2.5, "INCRBYFLOAT")
    check(r.append("greeting", " world") == 11 and r.strlen("greeting") == 11, "APPEND/STRLEN")
    check(r.getrange("greeting", 0, 4) == "hello", "GETRANGE")
    check(r.mset({"a": "1", "b": "2"}) is True and r.mget("a", "b", "nope") == ["1", "2", None], "MSET/MGET")
    check(r.expire("a", 100) is True and 90 <= r.ttl("a") <= 100, "EXPIRE/TTL")  # seconds left; a loaded machine may be slow
    check(r.pexpire("b", 100000) and 90000 <= r.pttl("b") <= 100000, "PEXPIRE/PTTL")
    check(r.persist("a") is True and r.ttl("a") == -1, "PERSIST")
    r.set("short", "v", px=50)
    time.sleep(0.2)
    check(r.get("short") is None, "a key expires")
    check(r.exists("a", "b", "nope") == 2, "EXISTS")
    check(r.type("a") in ("string", b"string"), "TYPE")
    check(r.rename("a", "a2") is True and r.get("a2") == "1", "RENAME")
    check(r.copy("a2", "a3") is True and r.get("a3") == "1", "COPY")
    check(sorted(r.keys("a*")) == ["a2", "a3"], "KEYS")
    check(sorted(r.scan_iter(match="a*", count=2)) == ["a2", "a3"], "SCAN")
    check(r.dbsize() == len(r.keys("*")), "DBSIZE")
    check(r.delete("a2", "a3", "nope") == 2, "DEL")
    check(r.getdel("b") == "2" and r.get("b") is None, "GETDEL")
    check(r.set("binary", b"\x00\xff\r\n") and redis.Redis(port=port, protocol=protocol).get("binary") == b"\x00\xff\r\n", "binary-safe values")
    # Databases
    r3 = redis.Redis(port=port, protocol=protocol, db=3, decode_responses=True)
    r3.set("in3", "x")
    check(r.get("in3") is None and r3.get("in3") == "x", "SELECT keeps databases apart")
    check(r.swapdb(0, 3) is True and r.get("in3") == "x", "SWAPDB")
    r.swapdb(0, 3)
    # Transactions
    pipe = r.pipeline(transaction=True)
    pipe.set("t", "1").incr("t").get("t")
    check(pipe.execute() == [True, 2, "2"], "MULTI/EXEC")
    with r.pipeline() as pipe:
        pipe.watch("t")
        other = redis.Redis(port=port, protocol=protocol)
        other.set("t", "changed")
        pipe.multi()
        pipe.set("t", "mine")
        try:
            pipe.execute()
            check(False, "WATCH: a changed key aborts EXEC")
        except redis.WatchError:
            pass
    check(r.get("t") == "changed", "the aborted transaction changed nothing")
    # Errors keep the connection open
    try:
        r.execute_command("NOSUCHCOMMAND", "x")
        check(False, "unknown command")
    except redis.ResponseError as error:
        check("unknown command" in str(error), "unknown command text: %s" % error)
    r.set("text", "abc")
    try:
        r.incr("text")
        check(False, "INCR on text")
    except redis.ResponseError as error:
        check("not an integer" in str(error), "INCR error text")
    check(r.ping(), "the connection stays open after errors")
    # Limits: a command too large for one log entry is refused, and nothing is written.
    try:
        r.set("huge", "x" * (9 << 20))
        check(False, "a 9 MiB value is refused")
    except redis.ResponseError as error:
        check("over the limit" in str(error), "too-large text: %s" % error)
    check(r.get("huge") is None, "the refused write changed nothing")
    # Replies that differ between replicas cannot be queued.
    pipe = r.pipeline(transaction=True)
    pipe.set("q", "1").keys("*")
    try:
        pipe.execute()
        check(False, "KEYS inside MULTI is refused")
    except (redis.ResponseError, redis.exceptions.ExecAbortError) as error:
        check("EXECABORT" in str(error) or "cannot be queued" in str(error), "MULTI KEYS: %s" % error)
    check(r.get("q") is None, "the aborted transaction wrote nothing")
    # Introspection
    info = r.info("keel")
    check(info.get("keel_role") == "leader" and int(info.get("keel_commit_index")) > 0, "INFO keel: %s" % info)
    check("redis_version" in r.info("server"), "INFO server")
    check(r.client_setname("checker") and r.client_getname() == "checker", "CLIENT SETNAME/GETNAME")
    check(isinstance(r.client_id(), int), "CLIENT ID")
    check("checker" in str(r.client_list()), "CLIENT LIST")
    check(r.client_info().get("cmd") == "client", "CLIENT INFO shows its own command: %s" % r.client_info())
    check(r.config_get("appendfsync").get("appendfsync") in ("always", "everysec", "never"), "CONFIG GET")
    rewrite = r.config_get("auto-aof-rewrite-*")
    check(rewrite == {"auto-aof-rewrite-percentage": "100", "auto-aof-rewrite-min-size": "67108864"},
          "CONFIG GET shows the checkpoint triggers under Redis's names: %s" % rewrite)
    check(len(r.time()) == 2, "TIME")
    check(r.echo("hi") == "hi", "ECHO")
    check(r.command_count() > 40, "COMMAND COUNT")
    check(r.lastsave() is not None, "LASTSAVE")
    check(r.save() is True, "SAVE")
    check(r.execute_command("WAIT", 0, 100) == 0, "WAIT on one node")
    check(r.execute_command("READONLY") in ("OK", True) and r.get("t") == "changed", "READONLY reads")
    check(r.execute_command("READWRITE") in ("OK", True), "READWRITE")
    r.flushall()
    check(r.dbsize() == 0, "FLUSHALL")
    print("ok", flush=True)


def raw(port, payload, wait=0.3):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(payload)
    s.settimeout(wait)
    data = b""
    closed = False
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
    except socket.timeout:
        pass
    s.close()
    return data, closed


def malformed(port):
    data, closed = raw(port, b"PING\r\n")
    check(data == b"+PONG\r\n" and not closed, "inline PING: %r" % data)
    data, closed = raw(port, b'SET "a b" \'c d\'\r\nGET "a b"\r\n')
    check(data == b"+OK\r\n$3\r\nc d\r\n", "inline quoting: %r" % data)
    data, closed = raw(port, b"*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n*1\r\n$4\r\nPING\r\n")
    check(data == b"$2\r\nhi\r\n+PONG\r\n", "pipelined multibulk: %r" % data)
    data, closed = raw(port, b"*1\r\n:4\r\nPING\r\n")
    check(data.startswith(b"-ERR Protocol error: expected '$', got ':'") and closed, "expected $: %r" % data)
    data, closed = raw(port, b"*1\r\n$999999999999\r\n")
    check(data.startswith(b"-ERR Protocol error: invalid bulk length") and closed, "bulk length: %r" % data)
    data, closed = raw(port, b"*99999999999\r\n")
    check(data.startswith(b"-ERR Protocol error: invalid multibulk length") and closed, "multibulk length: %r" % data)
    data, closed = raw(port, b'SET "unbalanced\r\n')
    check(data.startswith(b"-ERR Protocol error: unbalanced quotes") and closed, "unbalanced quotes: %r" % data)
    data, closed = raw(port, b"A" * (70 * 1024))
    check(data.startswith(b"-ERR Protocol error: too big inline request") and closed, "inline limit: %r" % data[:80])
    data, closed = raw(port, b"*1\r\n$4\r\nPI")
    check(data == b"" and not closed, "a partial request waits")
    data, closed = raw(port, b"*1\r\n$6\r\nx\r\n+OK\r\n")
    check(data.count(b"\r\n") == 1 and data.startswith(b"-ERR unknown command 'x +OK'"), "line breaks in an echoed name: %r" % data)
    data, closed = raw(port, b"WRONG\r\n")
    check(data.startswith(b"-ERR unknown command 'WRONG'") and not closed, "unknown command keeps the connection: %r" % data)
    data, closed = raw(port, b"*3\r\n$3\r\nGET\r\n$1\r\na\r\n$1\r\nb\r\n")
    check(data == b"-ERR wrong number of arguments for 'get' command\r\n" and not closed, "arity: %r" % data)
    data, closed = raw(port, b"HELLO 3\r\nGET nothing\r\nHELLO 4\r\n")
    check(b"%7\r\n" in data and b"_\r\n" in data and b"-NOPROTO" in data, "HELLO 3 and RESP3 null: %r" % data)
    # PING, ECHO and SELECT inside MULTI: answered in their places; SELECT applies after EXEC.
    data, closed = raw(port, b"MULTI\r\nSET m 1\r\nSELECT 2\r\nPING\r\nSET m 2\r\nECHO hi\r\nSELECT 99\r\nEXEC\r\n"
                             b"GET m\r\nSELECT 0\r\nGET m\r\nMULTI\r\nSELECT 5\r\nDISCARD\r\nGET m\r\n")
    expected = (b"+OK\r\n" + b"+QUEUED\r\n" * 6 + b"*6\r\n+OK\r\n+OK\r\n+PONG\r\n+OK\r\n$2\r\nhi\r\n-ERR DB index is out of range\r\n"
                b"$1\r\n2\r\n+OK\r\n$1\r\n1\r\n+OK\r\n+QUEUED\r\n+OK\r\n$1\r\n1\r\n")
    check(data == expected and not closed, "PING, ECHO, SELECT in MULTI: %r" % data)
    data, closed = raw(port, b"MULTI\r\nSELECT\r\nEXEC\r\nCONFIG GET x\r\nMULTI\r\nCONFIG GET x\r\nEXEC\r\n")
    check(data.count(b"EXECABORT") == 2 and b"wrong number of arguments for 'select'" in data, "bad queued commands abort: %r" % data)
    # A deep pipeline (more requests than the server keeps parsed at once): every one is answered, in order.
    count = 20000
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"".join(b"*3\r\n$3\r\nSET\r\n$4\r\npipe\r\n$%d\r\n%d\r\n" % (len(str(i)), i) for i in range(count)) + b"GET pipe\r\n")
    s.settimeout(60)
    received = b""
    expected_tail = b"$%d\r\n%d\r\n" % (len(str(count - 1)), count - 1)
    while not received.endswith(b"+OK\r\n" + expected_tail):
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        received += chunk
    s.close()
    check(received.count(b"+OK\r\n") == count and received.endswith(expected_tail), "a %d-deep pipeline: %d replies" % (count, received.count(b"+OK\r\n")))
    data, closed = raw(port, b"QUIT\r\nPING\r\n")
    check(data == b"+OK\r\n" and closed, "QUIT closes: %r" % data)
    print("ok", flush=True)


def auth(port, password):
    data, closed = raw(port, b"GET a\r\nAUTH wrong\r\nAUTH " + password.encode() + b"\r\nPING\r\n")
    check(data == b"-NOAUTH Authentication required.\r\n-WRONGPASS invalid username-password pair or user is disabled.\r\n+OK\r\n+PONG\r\n",
          "requirepass: %r" % data)
    # Before AUTH, Redis 7's smaller limits: 10 elements, 16 KiB bulk strings; then the connection closes.
    data, closed = raw(port, b"*11\r\n$4\r\nMSET\r\n")
    check(data.startswith(b"-ERR Protocol error: unauthenticated multibulk length") and closed, "unauthenticated multibulk: %r" % data)
    data, closed = raw(port, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$16385\r\n")
    check(data.startswith(b"-ERR Protocol error: unauthenticated bulk length") and closed, "unauthenticated bulk: %r" % data)
    big = b"x" * 20000
    data, closed = raw(port, b"AUTH " + password.encode() + b"\r\n*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$20000\r\n" + big + b"\r\n")
    check(data == b"+OK\r\n+OK\r\n" and not closed, "after AUTH in the same packet, the usual limits: %r" % data[:80])
    r = redis.Redis(port=port, password=password, decode_responses=True)
    check(r.set("k", "v") and r.get("k") == "v", "redis-py with a password")
    r3 = redis.Redis(port=port, password=password, protocol=3, decode_responses=True)
    check(r3.get("k") == "v", "HELLO 3 AUTH")
    print("ok", flush=True)


def writer(ports, limit=None):
    """Writes until `limit` writes (or, without one, until 40 failures in a row)."""
    clients = [redis.Redis(port=p, socket_timeout=3, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)) for p in ports]
    i = 0
    failures = 0
    while failures < 20 and (limit is None or i < limit):
        i += 1
        try:
            clients[i % len(clients)].set("w:%d" % i, str(i))
            print(i, flush=True)
            failures = 0
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            # Its outcome is unknown: never counted as acknowledged, and the key is never reused.
            failures += 1
            time.sleep(0.05)


def verify(path, ports):
    acknowledged = [int(line) for line in open(path) if line.strip().isdigit()]
    check(acknowledged, "the writer acknowledged something")
    for port in ports:
        r = redis.Redis(port=port, decode_responses=True)
        for attempt in range(200):
            try:
                values = r.mget(["w:%d" % i for i in acknowledged])
                break
            except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
                time.sleep(0.1)
        else:
            check(False, "port %d answers" % port)
        missing = [i for i, value in zip(acknowledged, values) if value != str(i)]
        check(not missing, "port %d lost acknowledged writes: %s" % (port, missing[:10]))
    print("ok %d" % len(acknowledged), flush=True)


def http_checks(port, http_port):
    import json
    import re
    import urllib.error
    import urllib.request
    r = redis.Redis(port=port, decode_responses=True)
    r.set("m", "1")
    r.get("m")
    base = "http://127.0.0.1:%d" % http_port
    health = json.loads(urllib.request.urlopen(base + "/health").read())
    check(health["status"] == "ok" and health["role"] == "leader" and health["leader"] == 1, "/health: %s" % health)
    response = urllib.request.urlopen(base + "/metrics")
    check(response.headers["Content-Type"].startswith("text/plain; version=0.0.4"), "metrics content type")
    text = response.read().decode()
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})? -?[0-9.e+-]+$')
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            check(re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$", line), "comment line: %r" % line)
            continue
        check(sample.match(line), "sample line in the Prometheus text format: %r" % line)
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    for name in ["keel_commands_total", "keel_fsyncs_total", "keel_log_bytes_written_total", "keel_raft_term",
                 'keel_raft_role{role="leader"}', "keel_raft_commit_index", "keel_raft_applied_index", "keel_checkpoint_age_seconds",
                 'keel_command_duration_seconds_count{kind="write"}', 'keel_command_duration_seconds_count{kind="read"}']:
        check(name in values, "metric %s present" % name)
    check(values['keel_raft_role{role="leader"}'] == 1 and values["keel_fsyncs_total"] > 0, "role and fsyncs")
    check(values['keel_command_duration_seconds_count{kind="write"}'] >= 1, "write latency recorded")
    check(values['keel_command_duration_seconds_bucket{kind="write",le="+Inf"}'] == values['keel_command_duration_seconds_count{kind="write"}'], "histogram +Inf bucket = count")
    page = urllib.request.urlopen(base + "/").read().decode()
    check('id="role">leader<' in page and 'id="member-1"' in page, "status page")
    try:
        urllib.request.urlopen(base + "/nope")
        check(False, "404")
    except urllib.error.HTTPError as error:
        check(error.code == 404, "404 for an unknown path")
    print("ok", flush=True)

def full_disk(port, filler):
    """The data directory's file system is nearly full (the filler takes the rest): writes are
    refused with a clear error once the log needs room, reads go on, and writes resume once the
    filler is gone. Prints the number of acknowledged 512 KiB values."""
    r = redis.Redis(port=port)
    value = lambda i: bytes([i % 251]) * (512 << 10)
    acknowledged, refusal = 0, None
    for i in range(1000):
        try:
            r.set("big:%d" % i, value(i))
            acknowledged += 1
        except redis.ResponseError as error:
            refusal = str(error)
            break
    check(refusal is not None and "no space left on the disk" in refusal, "a full disk refuses the write: %r" % refusal)
    check(acknowledged > 10, "writes were acknowledged before the disk filled (%d)" % acknowledged)
    check(r.get("big:0") == value(0), "reads go on while the disk is full")
    os.remove(filler)
    resumed = False
    for _ in range(150):
        try:
            resumed = r.set("after", "room") is True
            break
        except redis.ResponseError:
            time.sleep(0.1)
    check(resumed, "writes resume once there is room")
    for i in range(acknowledged):
        check(r.get("big:%d" % i) == value(i), "acknowledged value %d kept" % i)
    print(acknowledged, flush=True)


def pipelined_failures(port):
    """A node without a leader: three pipelined GETs get three error replies, in one go."""
    data, closed = raw(port, b"GET a\r\nGET b\r\nGET c\r\nPING\r\n", wait=8)
    lines = data.split(b"\r\n")[:-1]
    check(len(lines) == 4 and all(line.startswith(b"-") for line in lines[:3]) and lines[3] == b"+PONG" and not closed,
          "one error per pipelined read, then PONG: %r" % data)
    print("ok", flush=True)


def pipelined_limits(port):
    """Pipelined writes share a log entry, up to about 1 MiB of their arguments: a write over the
    entry's limit is refused alone, and the small ones around it are applied. (WAIT first keeps
    the connection busy for a second, its timeout, while the rest arrives whole to be batched.)"""
    def command(*words):
        out = b"*%d\r\n" % len(words)
        for word in words:
            out += b"$%d\r\n%s\r\n" % (len(word), word)
        return out
    payload = (command(b"WAIT", b"1", b"1000") + command(b"SET", b"small", b"1")
               + command(b"SET", b"big", b"x" * (9 << 20)) + command(b"SET", b"after", b"2")
               + command(b"GET", b"small") + command(b"GET", b"after"))
    data, closed = raw(port, payload, wait=3)
    lines = data.split(b"\r\n")
    check(len(lines) == 9 and lines[0] == b":0" and lines[1] == b"+OK" and lines[2].startswith(b"-ERR")
          and b"over the limit" in lines[2] and lines[3] == b"+OK" and lines[4:8] == [b"$1", b"1", b"$1", b"2"]
          and not closed, "only the write over the limit is refused: %r" % data[:300])
    # A batch is bounded by its commands as the entry encodes them (4 bytes more for every
    # argument), not by their argument bytes: three DELs of 700,000 empty keys each are 2.8 MB in
    # the entry but 0 bytes of arguments, and batched together they were over the entry's limit
    # (8 MiB) and all refused. Each goes alone now, and each is answered.
    empty = b"$0\r\n\r\n" * 700000
    many = b"*700001\r\n$3\r\nDEL\r\n" + empty
    data, closed = raw(port, command(b"WAIT", b"1", b"1000") + many * 3 + command(b"GET", b"small"), wait=8)
    check(data == b":0\r\n" + b":0\r\n" * 3 + b"$1\r\n1\r\n" and not closed,
          "pipelined writes of many empty arguments are each answered, none refused for the batch's size: %r" % data[:300])
    print("ok", flush=True)


def transaction_limits(port):
    """A transaction and its watched keys must fit in one log entry (8 MiB): past that the server
    answers an error, keeps nothing more, and EXEC aborts; under it, EXEC runs."""
    r = redis.Redis(port=port, socket_timeout=30, single_connection_client=True)
    value = b"v" * (100 << 10)
    check(r.execute_command("MULTI") in (b"OK", "OK", True), "MULTI")
    answers = []
    for i in range(100):
        try:
            answers.append(r.execute_command("SET", "limit:%d" % i, value))
        except redis.ResponseError as error:
            answers.append(error)
    errors = [a for a in answers if isinstance(a, redis.ResponseError)]
    check(len(errors) == 1 and "over the limit of 8388608 bytes" in str(errors[0]),
          "one error once 10 MB of commands pass 8 MiB: %s" % errors[:2])
    check(len(answers) == 100, "every SET answered")
    try:
        r.execute_command("EXEC")
        check(False, "EXEC of a transaction over the limit is refused")
    except redis.ResponseError as error:
        check(isinstance(error, redis.exceptions.ExecAbortError), "EXECABORT: %r" % error)
    check(r.get("limit:0") is None, "nothing of it was applied")
    check(r.execute_command("MULTI") in (b"OK", "OK", True), "MULTI again")
    for i in range(70):
        r.execute_command("SET", "limit:%d" % i, value)
    replies = r.execute_command("EXEC")
    check(len(replies) == 70 and r.get("limit:69") == value, "7 MB of commands fit: %d replies" % len(replies))
    big = [b"w%d" % i + b"k" * (1 << 20) for i in range(9)]
    try:
        r.execute_command("WATCH", *big)
        check(False, "WATCH of 9 MiB of keys is refused")
    except redis.ResponseError as error:
        check("too many watched keys" in str(error), "WATCH over the limit: %s" % error)
    check(r.execute_command("WATCH", *big[:7]) in (b"OK", "OK", True), "7 MiB of watched keys fit")
    try:
        r.execute_command("WATCH", *big[7:])
        check(False, "watching 2 MiB more is refused")
    except redis.ResponseError as error:
        check("too many watched keys" in str(error), "WATCH past the limit in total: %s" % error)
    check(r.execute_command("UNWATCH") in (b"OK", "OK", True) and r.execute_command("WATCH", *big[7:]) in (b"OK", "OK", True),
          "UNWATCH gives the room back")
    r.execute_command("UNWATCH")

    # At the edge: the largest SET a transaction admits (alone, and with a watched key) must also
    # fit in the log entry EXEC makes of it, so the server's count of the entry's bytes is not low.
    for watch in (False, True):
        transaction_edge(r, watch)
    print("ok", flush=True)


def transaction_edge(r, watch):
    def begin():
        if watch:
            check(r.execute_command("WATCH", "edge:w") in (b"OK", "OK", True), "WATCH edge:w")
        check(r.execute_command("MULTI") in (b"OK", "OK", True), "MULTI at the edge")

    def admitted(size):
        begin()
        try:
            r.execute_command("SET", "edge", b"e" * size)
            return True
        except redis.ResponseError as error:
            check("over the limit" in str(error), "at the edge: %s" % error)
            return False
        finally:
            r.execute_command("DISCARD")
    low, high = (8 << 20) - 200, 8 << 20  # admitted, refused
    check(admitted(low) and not admitted(high), "the edge lies between %d and %d" % (low, high))
    while high - low > 1:
        middle = (low + high) // 2
        if admitted(middle):
            low = middle
        else:
            high = middle
    begin()
    r.execute_command("SET", "edge", b"e" * low)
    try:
        replies = r.execute_command("EXEC")
    except redis.ResponseError as error:
        replies = "error: %s" % error
    check(replies in ([b"OK"], ["OK"], [True]) and r.strlen("edge") == low,
          "the largest SET admitted (%d bytes, watch %s) runs at EXEC: %r" % (low, watch, replies))
    r.delete("edge")


def slow_reader(port):
    """A client that pipelines large replies and reads nothing costs the server bounded memory
    (GETs of a 1 MiB value; MGETs of 256 MiB each, which must be held back mid-array); the
    replies all arrive, in order, once it reads, other clients are served meanwhile, and a QUIT behind held
    replies closes the connection only once they are written."""
    r = redis.Redis(port=port, socket_timeout=30)
    value = os.urandom(1 << 20)
    check(r.set("big", value), "SET big")
    one = b"$%d\r\n" % len(value) + value + b"\r\n"
    # Without backpressure every reply is copied into the connection's buffers: 2 GiB here.
    s = held_replies(r, port, b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n" * 2000, [(one, 2000)], 2000)
    s.sendall(b"PING\r\n")
    check(s.recv(64) == b"+PONG\r\n", "the slow reader's connection still works")
    s.close()
    # One MGET's reply, written whole, would be 256 MiB in the server's buffers at once.
    keys = 256
    mget = b"*%d\r\n$4\r\nMGET\r\n" % (keys + 1) + b"$3\r\nbig\r\n" * keys
    reply = [(b"*%d\r\n" % keys, 1), (one, keys)]
    s = held_replies(r, port, mget * 3 + b"QUIT\r\n", reply * 3 + [(b"+OK\r\n", 1)], 3, closed=True)
    s.close()
    # Distinct replies: above, every GET answers the same bytes, so a whole reply that overtook
    # another (one sent straight to the socket ahead of one the channel still holds) would pass.
    # 64 values of 256 KiB, each fetched 8 times in a shuffled order.
    values = [os.urandom(256 << 10) for _ in range(64)]
    for number, value in enumerate(values):
        r.set("distinct:%d" % number, value)
    order = [number for _ in range(8) for number in range(64)]
    random.Random(7).shuffle(order)
    gets = b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\ndistinct:%d\r\n" % (len("distinct:%d" % number), number) for number in order)
    expected = [(b"$%d\r\n" % len(values[number]) + values[number] + b"\r\n", 1) for number in order]
    s = held_replies(r, port, gets, expected, len(order))
    s.close()
    r.delete(*["distinct:%d" % number for number in range(64)])
    print("ok", flush=True)


def expected_bytes(segments, offset, count):
    """Bytes offset..<offset+count of the stream that repeats each (unit, times) of `segments`."""
    out = bytearray()
    for unit, times in segments:
        total = len(unit) * times
        if offset >= total:
            offset -= total
            continue
        while count > 0 and offset < total:
            start = offset % len(unit)
            take = min(len(unit) - start, count)
            out += unit[start:start + take]
            offset += take
            count -= take
        if count == 0:
            break
        offset = 0
    return bytes(out)


def held_replies(r, port, data, expected, count, closed=False):
    """Sends `data` on a new connection without reading, checks the server's growth meanwhile,
    then reads and compares everything with `expected`, a list of (bytes, times repeated) (and
    the end of the stream if `closed`)."""
    length = sum(len(unit) * times for unit, times in expected)
    before = int(r.info("memory")["used_memory_rss"])
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    offset, deadline = 0, time.time() + 30
    while offset < len(data) and time.time() < deadline:
        try:
            offset += s.send(data[offset:offset + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    check(offset == len(data), "all %d requests sent (%d bytes of %d)" % (count, offset, len(data)))
    time.sleep(2)
    check(r.ping(), "another client is served while one does not read")
    grown = int(r.info("memory")["used_memory_rss"]) - before
    check(grown < 128 << 20, "the server grew by %d bytes for a client that reads nothing" % grown)
    s.setblocking(True)
    s.settimeout(60)
    received, differ = 0, 0
    while received < length:
        chunk = s.recv(1 << 22)
        if not chunk:
            break
        differ += chunk != expected_bytes(expected, received, len(chunk))
        received += len(chunk)
    check(received == length and differ == 0,
          "all %d replies intact once read (%d of %d bytes, %d chunks differ)" % (count, received, length, differ))
    if closed:
        check(s.recv(64) == b"", "the connection closed after QUIT's reply")
    return s


def run_clients(client, clients, failures):
    """Runs client(0) … client(clients - 1) at once, each on a thread of its own, and checks that
    none of them recorded a failure."""
    import threading
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    check(not failures, "; ".join(failures[:5]))


def concurrent_reads(port, clients=40, rounds=150):
    """Each client writes its own keys in its database and reads them back at once, alone and in
    small pipelined groups, while the others do the same: the reads of many connections are
    answered together (one turn of the loop), and each must get its own replies, in its order."""
    failures = []

    def client(number):
        try:
            r = redis.Redis(port=port, db=number % 3, decode_responses=True)
            for i in range(rounds):
                key = "cr%d:%d" % (number, i % 5)
                value = "%d-%d" % (number, i)
                r.set(key, value)
                got = r.get(key)
                if got != value:
                    failures.append("client %d round %d: GET %s gave %r, not %r" % (number, i, key, got, value))
                    return
                pipe = r.pipeline(transaction=False)
                pipe.get(key)
                pipe.exists(key, "cr%d:absent" % number)
                pipe.mget(key, "cr%d:absent" % number)
                if pipe.execute() != [value, 1, [value, None]]:
                    failures.append("client %d round %d: a pipelined read group was answered out of turn" % (number, i))
                    return
        except Exception as error:  # noqa: BLE001 (reported below)
            failures.append("client %d: %r" % (number, error))

    run_clients(client, clients, failures)
    # Each database holds exactly its clients' keys.
    for database in range(3):
        r = redis.Redis(port=port, db=database, decode_responses=True)
        expected = sum(5 for n in range(clients) if n % 3 == database)
        held = len(r.keys("cr*"))
        check(held == expected, "database %d holds %d of the clients' keys, not %d" % (database, held, expected))
    print("ok")


def concurrent_writes(port, clients=40, rounds=100):
    """Each client sends single writes, one at a time, whose replies only it can expect, while the
    others do the same: the single writes of many connections that one turn of the loop reads go
    to the log as one entry, and each client must get its own reply (an error included), in its
    order, with nothing lost or applied twice."""
    failures = []
    shared = {database: [] for database in range(3)}
    before = redis.Redis(port=port, decode_responses=True).info("keel")

    def client(number):
        try:
            # A lost reply fails the check in 60 s instead of hanging it.
            r = redis.Redis(port=port, db=number % 3, decode_responses=True, socket_timeout=60)
            r.set("cw%d:text" % number, "not a number")
            for i in range(rounds):
                step = number + 1
                got = r.incrby("cw%d:count" % number, step)
                if got != (i + 1) * step:
                    failures.append("client %d round %d: INCRBY gave %r, not %r" % (number, i, got, (i + 1) * step))
                    return
                got = r.append("cw%d:log" % number, "x" * step)
                if got != (i + 1) * step:
                    failures.append("client %d round %d: APPEND gave %r, not %r" % (number, i, got, (i + 1) * step))
                    return
                got = r.set("cw%d:nx" % number, str(i), nx=True)
                if got != (True if i == 0 else None):
                    failures.append("client %d round %d: SET NX gave %r" % (number, i, got))
                    return
                got = r.set("cw%d:swap" % number, "%d-%d" % (number, i), get=True)
                if got != ("%d-%d" % (number, i - 1) if i > 0 else None):
                    failures.append("client %d round %d: SET GET gave %r" % (number, i, got))
                    return
                try:
                    r.incr("cw%d:text" % number)
                    failures.append("client %d round %d: INCR of a string did not fail" % (number, i))
                    return
                except redis.ResponseError as error:
                    if "not an integer" not in str(error):
                        failures.append("client %d round %d: INCR of a string gave %r" % (number, i, error))
                        return
                shared[number % 3].append(r.incr("cw:shared"))
        except Exception as error:  # noqa: BLE001 (reported below)
            failures.append("client %d: %r" % (number, error))

    run_clients(client, clients, failures)
    for database in range(3):
        writers = sum(1 for n in range(clients) if n % 3 == database)
        got = sorted(shared[database])
        check(got == list(range(1, writers * rounds + 1)),
              "database %d: the shared counter's INCRs gave each value once (%d replies, %d distinct)" % (database, len(got), len(set(got))))
        r = redis.Redis(port=port, db=database, decode_responses=True)
        check(int(r.get("cw:shared")) == writers * rounds, "database %d: the shared counter holds every INCR" % database)
        for n in range(database, clients, 3):
            check(int(r.get("cw%d:count" % n)) == rounds * (n + 1) and r.strlen("cw%d:log" % n) == rounds * (n + 1),
                  "client %d's keys hold each of its writes once" % n)
    after = redis.Redis(port=port, decode_responses=True).info("keel")
    entries = after["keel_shared_write_entries"] - before["keel_shared_write_entries"]
    writes = after["keel_shared_writes"] - before["keel_shared_writes"]
    check(writes > entries > 0, "these clients' single writes shared log entries (INFO keel: %d entries, %d writes)" % (entries, writes))
    direct = after["keel_direct_writes"] - before["keel_direct_writes"]
    check(direct > 0, "replies went straight to the sockets (INFO keel: %d direct writes)" % direct)
    print("ok")


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "basic":
        basic(int(sys.argv[2]), int(sys.argv[3]))
    elif command == "malformed":
        malformed(int(sys.argv[2]))
    elif command == "auth":
        auth(int(sys.argv[2]), sys.argv[3])
    elif command == "writer":
        writer([int(p) for p in sys.argv[2:]])
    elif command == "writer-limit":
        writer([int(p) for p in sys.argv[3:]], limit=int(sys.argv[2]))
    elif command == "http":
        http_checks(int(sys.argv[2]), int(sys.argv[3]))
    elif command == "full-disk":
        full_disk(int(sys.argv[2]), sys.argv[3])
    elif command == "pipelined-failures":
        pipelined_failures(int(sys.argv[2]))
    elif command == "transaction-limits":
        transaction_limits(int(sys.argv[2]))
    elif command == "pipelined-limits":
        pipelined_limits(int(sys.argv[2]))
    elif command == "slow-reader":
        slow_reader(int(sys.argv[2]))
    elif command == "concurrent-reads":
        concurrent_reads(int(sys.argv[2]))
    elif command == "concurrent-writes":
        concurrent_writes(int(sys.argv[2]))
    elif command == "verify":
        verify(sys.argv[2], [int(p) for p in sys.argv[3:]])
    else:
        sys.exit("unknown command " + command)
