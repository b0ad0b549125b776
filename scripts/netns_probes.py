"""Programs the testbed runs inside its namespaces, each in a separate interpreter.

Source text for ``python -c`` (stdlib only), so the namespaces need nothing installed:
``_PING_SRC`` (ICMP echo), ``_SINK_SRC`` and ``_SOURCE_SRC`` (one TCP stream, measured at the
receiver). :mod:`netns_testbed` runs them (``Testbed.ping``, ``Testbed.measure_tcp``).
"""

# ICMP echo with a raw socket (no dependency on iputils-ping).  argv: src dst count timeout
_PING_SRC = r"""
import os, select, socket, struct, sys, time
src, dst, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF
ident = os.getpid() & 0xFFFF
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.bind((src, 0))
except OSError as e:
    print("socket:", e)
    sys.exit(2)
ok = 0
for seq in range(1, count + 1):
    payload = struct.pack("!d", time.time()) + b"stolon-testbed"
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    pkt = struct.pack("!BBHHH", 8, 0, csum(hdr + payload), ident, seq) + payload
    try:
        s.sendto(pkt, (dst, 0))
    except OSError as e:
        print(f"seq={seq} send failed: {e}")
        continue
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            print(f"seq={seq} timeout")
            break
        data, addr = s.recvfrom(4096)
        ihl = (data[0] & 0x0F) * 4
        if len(data) < ihl + 8:
            continue
        typ, _code, _ck, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if typ == 0 and rid == ident and rseq == seq and addr[0] == dst:
            ok += 1
            print(f"seq={seq} reply from {dst} {1e3 * (time.monotonic() - t0):.3f} ms")
            break
sys.exit(0 if ok == count else 1)
"""

# TCP sink: prints its port, accepts one connection, reads to EOF, prints a JSON result.
# argv: bind_ip timeout
_SINK_SRC = r"""
import json, socket, sys, time
ip, timeout = sys.argv[1], float(sys.argv[2])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((ip, 0))
ls.listen(1)
ls.settimeout(timeout)
print(ls.getsockname()[1], flush=True)
c, peer = ls.accept()
c.settimeout(timeout)
buf = bytearray(1 << 20)
n = 0
t0 = t1 = None
while True:
    k = c.recv_into(buf)
    if not k:
        break
    now = time.monotonic()
    if t0 is None:
        t0 = now  # bytes of the first read are not counted: the clock starts after them
    else:
        n += k
    t1 = now
secs = (t1 - t0) if t0 is not None else 0.0
print(json.dumps({"bytes": n, "seconds": secs, "peer": peer[0]}), flush=True)
"""

# TCP source: sends zeros for a fixed time, then closes.  argv: src_ip dst_ip port seconds
_SOURCE_SRC = r"""
import socket, sys, time
src, dst, port, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((dst, port), timeout=10, source_address=(src, 0))
buf = memoryview(bytes(256 * 1024))
end = time.monotonic() + secs
while time.monotonic() < end:
    s.sendall(buf)
s.shutdown(socket.SHUT_WR)
s.settimeout(30)
s.recv(1)
s.close()
"""
