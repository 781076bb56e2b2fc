"""Tests of lb.forwarder: the NAT decision for one packet, as a table (Katran style).

Each case is a description, a short script of steps fed to one fresh forwarder in order, and
what is expected afterwards. A step is either a packet with its expected verdict and expected
output frame, or an action on the world between packets (a server goes down, a pool is
refreshed). Packets are built with scapy and so are expected outputs, with every checksum
computed by scapy: an output that equals its expected frame byte for byte has the right
headers and valid checksums. Outputs are also re-parsed with checksums recomputed, as a
second, independent check.

The scheduler in most cases is ``rr`` over s1, s2 (in that order), so the server a new flow
reaches is known in advance.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw

from lb import packet as pk
from lb.addr import int_to_ip, ip_to_int
from lb.config import Config, parse_config
from lb.forwarder import DROP, FORWARD, SEND, Forwarder, ServiceCounts
from lb.persistence import PersistenceTable
from lb.servers import AdminState, RealServer
from lb.services import Service, ServiceSet, build_services
from lb.sessions import SessionTable, SessionTimeouts, TcpState

VIP = "198.51.100.10"
CLIENT = "198.51.100.77"
NEIGHBOUR = "198.51.100.78"  # same /24 as CLIENT
FAR = "192.0.2.7"  # another network
S1, S2, S3 = "198.18.0.11", "198.18.0.12", "198.18.0.13"
ROUTER = "198.18.0.254"
HTTP, DNS = 8080, 5353

VNET_NONE = bytes(pk.VNET_HDR_LEN)
VERDICTS = {DROP: "DROP", FORWARD: "FORWARD", SEND: "SEND"}
T0 = 1000.0


# --- configuration and the world under test ------------------------------------------------------


def make_config(*, scheduler: str = "rr", persistence: str = "none", netmask: int = 32,
                servers: Sequence[str] = (S1, S2), backups: Sequence[str] = (),
                max_sessions: int = 1000, alt_port: int | None = None,
                limits: Mapping[str, Any] | None = None) -> Config:
    """web: VIP:80/tcp → servers:8080; dns: VIP:53/udp → servers:5353 (rr); with
    ``alt_port``, also alt: VIP:alt_port/tcp → the web pool. ``limits``: per-source keys
    given to every virtual server (else the defaults)."""
    def pool(port: int) -> list[dict[str, Any]]:
        return ([{"address": a, "port": port} for a in servers]
                + [{"address": a, "port": port, "backup": True} for a in backups])

    virtual_servers: dict[str, Any] = {
        "web": {"address": VIP, "port": 80, "pool": "web", "scheduler": scheduler,
                "persistence": persistence, "persistence_netmask": netmask,
                "persistence_timeout": "10m"},
        "dns": {"address": VIP, "port": 53, "protocol": "udp", "pool": "dns",
                "scheduler": "rr"},
    }
    if alt_port is not None:
        virtual_servers["alt"] = {"address": VIP, "port": alt_port, "pool": "web",
                                  "scheduler": "rr"}
    for vs in virtual_servers.values():
        vs.update(limits or {})
    return parse_config({
        "node": {"name": "test", "control_socket": "/run/lbd-test/control.sock"},
        "dataplane": {"client_interface": "eth0", "server_interface": "eth1"},
        "sessions": {"max_sessions": max_sessions},
        "virtual_servers": virtual_servers,
        "pools": {"web": {"servers": pool(HTTP)}, "dns": {"servers": pool(DNS)}},
    }, "test_forwarder")


@dataclass
class World:
    services: ServiceSet
    sessions: SessionTable[Service]
    persistence: PersistenceTable[Service]
    fwd: Forwarder

    def server(self, pool: str, addr: str) -> RealServer:
        srv = self.services.pools[pool].find(ip_to_int(addr), HTTP if pool == "web" else DNS)
        assert srv is not None
        return srv


def make_world(config: Config | None = None) -> World:
    cfg = config or make_config()
    services = build_services(cfg)
    sessions: SessionTable[Service] = SessionTable(
        SessionTimeouts(), cfg.sessions.max_sessions, tick=0.1, observer=ServiceCounts())
    persistence: PersistenceTable[Service] = PersistenceTable()
    return World(services, sessions, persistence, Forwarder(services, sessions, persistence))


Action = Callable[[World], None]


def set_up(*addrs: str, up: bool = True, pool: str = "web") -> Action:
    """Mark servers up or down (as the health monitor does) and refresh their pool."""
    def act(w: World) -> None:
        for a in addrs:
            w.server(pool, a).up = up
        w.services.pools[pool].refresh()
    return act


def down(*addrs: str, pool: str = "web") -> Action:
    return set_up(*addrs, up=False, pool=pool)


def admin(addr: str, state: AdminState, pool: str = "web") -> Action:
    def act(w: World) -> None:
        w.server(pool, addr).admin = state
        w.services.pools[pool].refresh()
    return act


# --- packets -------------------------------------------------------------------------------------


def frame(p: Packet | bytes, vnet: bytes = VNET_NONE) -> bytes:
    """A TUN frame: virtio-net header + IPv4 packet."""
    return vnet + bytes(p)


def tcp(src: str, dst: str, sport: int, dport: int, flags: str = "S", *, seq: int = 1000,
        ack: int = 0, payload: bytes = b"", ttl: int = 63, chksum: int | None = None) -> Packet:
    seg = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=29200)
    if chksum is not None:
        seg.chksum = chksum
    p: Packet = IP(src=src, dst=dst, id=4242, ttl=ttl) / seg
    return p / Raw(payload) if payload else p


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"ping",
        chksum: int | None = None) -> Packet:
    dgram = UDP(sport=sport, dport=dport)
    if chksum is not None:
        dgram.chksum = chksum
    p: Packet = IP(src=src, dst=dst, id=77, ttl=63) / dgram / Raw(payload)
    return p


def rst(src: str, dst: str, sport: int, dport: int, *, seq: int, ack: int, flags: str) -> Packet:
    """What lb.packet.build_rst writes: ID 0, DF, TTL 64, window 0."""
    p: Packet = IP(src=src, dst=dst, id=0, flags="DF", ttl=64) / TCP(
        sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, window=0)
    return p


def icmp_error(src: str, dst: str, quoted: bytes, type_: int = 3, code: int = 3,
               **fields: Any) -> Packet:
    p: Packet = IP(src=src, dst=dst, id=9, ttl=60) / ICMP(type=type_, code=code, **fields) \
        / Raw(quoted)
    return p


def vnet(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
         csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return pk.VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def with_l4_check(p: Packet, value: int) -> bytes:
    """The packet's bytes with its TCP/UDP checksum field set to ``value`` (a partial sum)."""
    data = bytearray(bytes(p))
    hl = (data[0] & 0x0F) * 4
    at = hl + (16 if data[9] == pk.PROTO_TCP else 6)
    struct.pack_into("!H", data, at, value)
    return bytes(data)


def pseudo(src: str, dst: str, proto: int, l4_len: int) -> int:
    """Independent reference pseudo-header sum (16-bit words, end-around carry)."""
    words = struct.unpack("!6H", struct.pack("!IIBBH", ip_to_int(src), ip_to_int(dst), 0, proto,
                                             l4_len))
    total = 0
    for w in words:
        total += w
        total = (total & 0xFFFF) + (total >> 16)
    return total


# Some packets used by many cases.
SYN = tcp(CLIENT, VIP, 40000, 80)
SYN_TO_S1 = tcp(CLIENT, S1, 40000, HTTP)
SYNACK_FROM_S1 = tcp(S1, CLIENT, HTTP, 40000, "SA", seq=5000, ack=1001)
SYNACK_FROM_VIP = tcp(VIP, CLIENT, 80, 40000, "SA", seq=5000, ack=1001)
ACK = tcp(CLIENT, VIP, 40000, 80, "A", seq=1001, ack=5001)
ACK_TO_S1 = tcp(CLIENT, S1, 40000, HTTP, "A", seq=1001, ack=5001)
DNS_Q = udp(CLIENT, VIP, 33000, 53, b"query")
DNS_Q_TO_S1 = udp(CLIENT, S1, 33000, DNS, b"query")
DNS_R_FROM_S1 = udp(S1, CLIENT, DNS, 33000, b"answer")
DNS_R_FROM_VIP = udp(VIP, CLIENT, 53, 33000, b"answer")


def syn_from(client: str, port: int) -> Packet:
    return tcp(client, VIP, port, 80)


def syn_to(client: str, port: int, server: str) -> Packet:
    return tcp(client, server, port, HTTP)


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One packet in, the verdict expected, and (FORWARD/SEND) the frame expected out."""

    packet: bytes
    verdict: int
    out: bytes | None = None


def fwd(packet: Packet | bytes, out: Packet | bytes, vnet_hdr: bytes = VNET_NONE) -> Step:
    return Step(frame(packet, vnet_hdr), FORWARD, frame(out, vnet_hdr))


def send(packet: Packet | bytes, out: Packet) -> Step:
    return Step(frame(packet), SEND, frame(out))


def drop(packet: Packet | bytes) -> Step:
    return Step(frame(packet), DROP)


@dataclass(frozen=True)
class Case:
    description: str
    steps: tuple[Step | Action, ...]
    drops: Mapping[str, int] = field(default_factory=dict)
    counters: Mapping[str, int] = field(default_factory=dict)
    config: Callable[[], Config] = make_config
    check: Action | None = None  # further assertions on the world at the end


def limited(scheduler: str = "rr", **limits: Any) -> Callable[[], Config]:
    return lambda: make_config(scheduler=scheduler,
                               limits={"max_conns_per_source": 0,
                                       "max_conn_rate_per_source": 0, **limits})


def forwarded(packet: Packet) -> Step:
    """Forwarded to a server the case does not name (a consistent scheduler's pick)."""
    return Step(frame(packet), FORWARD)


def sessions_in(n: int) -> Action:
    def check(w: World) -> None:
        assert len(w.sessions) == n
    return check


def _evicted_check(w: World) -> None:
    (s,) = list(w.sessions)
    assert (s.cport, w.sessions.half_open_evictions) == (40001, 1)


def _reuse_check(w: World) -> None:
    (s,) = list(w.sessions)
    assert s.state == TcpState.SYN_RECV
    assert w.server("web", S2) is s.server
    assert w.sessions.created_total == 2
    assert w.sessions.removed_total == 1
    assert w.services.services[0].active == 1  # ServiceCounts saw the reuse


def _retransmit_check(w: World) -> None:
    assert len(w.sessions) == 1
    assert w.sessions.created_total == 1


def _binding_moved_check(w: World) -> None:
    (b,) = list(w.persistence)
    assert b.server is w.server("web", S2)


PARTIAL_TCP_VNET = vnet(pk.VNET_F_NEEDS_CSUM, pk.VNET_GSO_TCPV4, 52, 1448, 20, 16)
PARTIAL_UDP_VNET = vnet(pk.VNET_F_NEEDS_CSUM, 0, 0, 0, 20, 6)
BULK = bytes(range(256)) * 16  # 4096 bytes: a GSO super-packet's worth


def partial(p: Packet, src: str, dst: str) -> bytes:
    """``p`` with its L4 checksum field holding the pseudo-header sum of (src, dst)."""
    ip_p = IP(bytes(p))
    proto = ip_p.proto
    return with_l4_check(p, pseudo(src, dst, proto, ip_p.len - ip_p.ihl * 4))


BIG_ACK = tcp(CLIENT, VIP, 40000, 80, "PA", seq=1001, ack=5001, payload=BULK)
BIG_ACK_TO_S1 = tcp(CLIENT, S1, 40000, HTTP, "PA", seq=1001, ack=5001, payload=BULK)
BIG_REPLY = tcp(S1, CLIENT, HTTP, 40000, "PA", seq=5001, ack=1001, payload=BULK)
BIG_REPLY_FROM_VIP = tcp(VIP, CLIENT, 80, 40000, "PA", seq=5001, ack=1001, payload=BULK)

CASES: list[Case] = [
    # --- the basic NAT path --------------------------------------------------------------------
    Case("client SYN to VIP:80 is forwarded to the scheduled server:8080",
         (fwd(SYN, SYN_TO_S1),),
         counters={"packets_in": 1, "bytes_in": len(SYN), "packets_out": 0},
         check=sessions_in(1)),
    Case("reply from the server is forwarded with source VIP:80",
         (fwd(SYN, SYN_TO_S1), fwd(SYNACK_FROM_S1, SYNACK_FROM_VIP)),
         counters={"packets_in": 1, "packets_out": 1, "bytes_out": len(SYNACK_FROM_S1)}),
    Case("a payload-carrying segment of an existing session follows it",
         (fwd(SYN, SYN_TO_S1), fwd(SYNACK_FROM_S1, SYNACK_FROM_VIP),
          fwd(tcp(CLIENT, VIP, 40000, 80, "PA", seq=1001, ack=5001, payload=b"GET / HTTP/1.0"),
              tcp(CLIENT, S1, 40000, HTTP, "PA", seq=1001, ack=5001,
                  payload=b"GET / HTTP/1.0"))),
         counters={"packets_in": 2, "packets_out": 1}),
    Case("a second flow goes to the next server (rr)",
         (fwd(SYN, SYN_TO_S1), fwd(syn_from(CLIENT, 40001), syn_to(CLIENT, 40001, S2))),
         check=sessions_in(2)),
    Case("reply with no session is dropped (no_session)",
         (drop(SYNACK_FROM_S1),),
         drops={"no_session": 1}, counters={"resets_sent": 0, "packets_out": 0}),
    Case("UDP round trip: query to server:5353, answer from VIP:53",
         (fwd(DNS_Q, DNS_Q_TO_S1), fwd(DNS_R_FROM_S1, DNS_R_FROM_VIP)),
         counters={"packets_in": 1, "packets_out": 1}),
    Case("UDP without checksum (0) keeps checksum 0 both ways",
         (fwd(udp(CLIENT, VIP, 33000, 53, chksum=0), udp(CLIENT, S1, 33000, DNS, chksum=0)),
          fwd(udp(S1, CLIENT, DNS, 33000, chksum=0), udp(VIP, CLIENT, 53, 33000, chksum=0)))),
    # --- refusals ------------------------------------------------------------------------------
    Case("SYN to a VIP port without virtual server is answered with RST|ACK (no_service)",
         (send(tcp(CLIENT, VIP, 40000, 81, seq=1000),
               rst(VIP, CLIENT, 81, 40000, seq=0, ack=1001, flags="RA")),),
         drops={"no_service": 1}, counters={"resets_sent": 1}, check=sessions_in(0)),
    Case("SYN with data to a VIP port without virtual server: ack covers SYN and data",
         (send(tcp(CLIENT, VIP, 40000, 81, seq=0xFFFFFFF0, payload=b"x" * 20),
               rst(VIP, CLIENT, 81, 40000, seq=0, ack=(0xFFFFFFF0 + 21) & 0xFFFFFFFF,
                   flags="RA")),),
         drops={"no_service": 1}, counters={"resets_sent": 1}),
    Case("UDP to a VIP port without virtual server is dropped, nothing sent (no_service)",
         (drop(udp(CLIENT, VIP, 33000, 54)),),
         drops={"no_service": 1}, counters={"resets_sent": 0}),
    Case("non-SYN TCP without session is answered with RST seq=ack (no_session)",
         (send(ACK, rst(VIP, CLIENT, 80, 40000, seq=5001, ack=0, flags="R")),),
         drops={"no_session": 1}, counters={"resets_sent": 1}, check=sessions_in(0)),
    Case("RST without session is dropped silently (a RST is never answered)",
         (drop(tcp(CLIENT, VIP, 40000, 80, "R", seq=1001)),),
         drops={"no_session": 1}, counters={"resets_sent": 0}),
    Case("SYN when no server is usable is answered with RST (no_server)",
         (down(S1, S2),
          send(SYN, rst(VIP, CLIENT, 80, 40000, seq=0, ack=1001, flags="RA"))),
         drops={"no_server": 1}, counters={"resets_sent": 1}, check=sessions_in(0)),
    Case("UDP when no server is usable is dropped (no_server)",
         (down(S1, S2, pool="dns"), drop(DNS_Q)),
         drops={"no_server": 1}, counters={"resets_sent": 0}),
    Case("disabled servers take no new flows (no_server)",
         (admin(S1, AdminState.DISABLED), admin(S2, AdminState.DRAIN),
          send(SYN, rst(VIP, CLIENT, 80, 40000, seq=0, ack=1001, flags="RA"))),
         drops={"no_server": 1}),
    Case("table full (max_sessions=1) of an established flow: a second flow is dropped, "
         "no RST (table_full)",
         (fwd(SYN, SYN_TO_S1), fwd(ACK, tcp(CLIENT, S1, 40000, HTTP, "A", seq=1001, ack=5001)),
          drop(syn_from(CLIENT, 40001)),
          fwd(ACK, tcp(CLIENT, S1, 40000, HTTP, "A", seq=1001, ack=5001))),
         drops={"table_full": 1}, counters={"resets_sent": 0},
         config=lambda: make_config(max_sessions=1), check=sessions_in(1)),
    Case("table full (max_sessions=1) of a half-open flow: a new SYN takes its place",
         (fwd(SYN, SYN_TO_S1), fwd(syn_from(CLIENT, 40001), syn_to(CLIENT, 40001, S2))),
         config=lambda: make_config(max_sessions=1), check=_evicted_check),
    Case("a flow whose server-side 5-tuple another session owns is dropped as a conflict, "
         "not as table_full (two virtual servers, one pool, same client port)",
         (fwd(SYN, SYN_TO_S1), drop(tcp(CLIENT, VIP, 40000, 8000))),
         drops={"flow_conflict": 1}, config=lambda: make_config(alt_port=8000),
         check=sessions_in(1)),
    Case("a closing session of another virtual server that holds the server-side 5-tuple "
         "is replaced by the new flow (the client reused its port for the other VIP)",
         (fwd(SYN, SYN_TO_S1), fwd(ACK, tcp(CLIENT, S1, 40000, HTTP, "A", seq=1001, ack=5001)),
          fwd(tcp(CLIENT, VIP, 40000, 80, "FA", seq=1001, ack=5001),
              tcp(CLIENT, S1, 40000, HTTP, "FA", seq=1001, ack=5001)),
          fwd(tcp(CLIENT, VIP, 40000, 8000), tcp(CLIENT, S1, 40000, HTTP))),
         config=lambda: make_config(alt_port=8000), check=sessions_in(1)),
    # --- ICMP ----------------------------------------------------------------------------------
    Case("ICMP echo request to the VIP is answered as an echo reply (TTL 64)",
         (fwd(IP(src=CLIENT, dst=VIP, id=5, ttl=50) / ICMP(type=8, id=7, seq=3) / Raw(b"abc"),
              IP(src=VIP, dst=CLIENT, id=5, ttl=64) / ICMP(type=0, id=7, seq=3) / Raw(b"abc")),),
         counters={"icmp_replies": 1, "packets_in": 0}),
    Case("ICMP echo request with a non-zero code is dropped (icmp_bad)",
         (drop(IP(src=CLIENT, dst=VIP) / ICMP(type=8, code=1)),),
         drops={"icmp_bad": 1}),
    Case("ICMP timestamp request to the VIP is dropped (icmp_unsupported)",
         (drop(IP(src=CLIENT, dst=VIP) / ICMP(type=13)),),
         drops={"icmp_unsupported": 1}),
    Case("ICMP echo reply from the server side is dropped (icmp_unsupported)",
         (drop(IP(src=S1, dst=CLIENT) / ICMP(type=0)),),
         drops={"icmp_unsupported": 1}),
    Case("ICMP port unreachable from a server about a UDP session is translated: outer src "
         "VIP, inner dst VIP:53 (the quote becomes the client's own datagram)",
         (fwd(DNS_Q, DNS_Q_TO_S1),
          fwd(icmp_error(S1, CLIENT, bytes(DNS_Q_TO_S1)),
              icmp_error(VIP, CLIENT, bytes(DNS_Q)))),
         counters={"packets_out": 1}),
    Case("ICMP fragmentation needed from a router, quoting 8 bytes of TCP, is translated",
         (fwd(SYN, SYN_TO_S1),
          fwd(icmp_error(ROUTER, CLIENT, bytes(SYN_TO_S1)[:28], code=4, nexthopmtu=1400),
              icmp_error(VIP, CLIENT, bytes(SYN)[:28], code=4, nexthopmtu=1400))),
         counters={"packets_out": 1}),
    Case("ICMP error from a client about a reply is translated towards the server",
         (fwd(DNS_Q, DNS_Q_TO_S1), fwd(DNS_R_FROM_S1, DNS_R_FROM_VIP),
          fwd(icmp_error(CLIENT, VIP, bytes(DNS_R_FROM_VIP)),
              icmp_error(CLIENT, S1, bytes(DNS_R_FROM_S1)))),
         counters={"packets_in": 2, "packets_out": 1}),
    Case("ICMP error about an unknown flow is dropped (icmp_no_session)",
         (drop(icmp_error(S1, CLIENT, bytes(DNS_Q_TO_S1))),
          drop(icmp_error(CLIENT, VIP, bytes(DNS_R_FROM_VIP)))),
         drops={"icmp_no_session": 2}),
    Case("ICMP error quoting too little of the packet is dropped (icmp_bad)",
         (fwd(DNS_Q, DNS_Q_TO_S1), drop(icmp_error(S1, CLIENT, bytes(DNS_Q_TO_S1)[:24]))),
         drops={"icmp_bad": 1}),
    # --- malformed packets: the packet.Drop reason, lowercased -------------------------------
    Case("truncated: fewer bytes than an IPv4 header",
         (drop(bytes(SYN)[:19]),), drops={"truncated": 1}),
    Case("not IPv4: an IPv6 packet",
         (drop(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP()),), drops={"not_ipv4": 1}),
    Case("IHL below 5",
         (drop(bytes([0x44]) + bytes(SYN)[1:]),), drops={"bad_ihl": 1}),
    Case("total length beyond the bytes read",
         (drop(bytes(SYN)[:-4]),), drops={"bad_length": 1}),
    Case("a fragment (MF set)",
         (drop(IP(src=CLIENT, dst=VIP, flags="MF") / UDP(sport=1, dport=53)),),
         drops={"fragment": 1}),
    Case("a non-first fragment (offset set)",
         (drop(IP(src=CLIENT, dst=VIP, frag=100) / Raw(b"x" * 16)),), drops={"fragment": 1}),
    Case("TCP data offset below 5",
         (drop(IP(src=CLIENT, dst=VIP) / TCP(dport=80, dataofs=4)),), drops={"bad_l4": 1}),
    Case("UDP length beyond the packet",
         (drop(IP(src=CLIENT, dst=VIP) / UDP(dport=53, len=100) / Raw(b"x")),),
         drops={"bad_l4": 1}),
    Case("neither TCP, UDP nor ICMP (GRE)",
         (drop(IP(src=CLIENT, dst=VIP, proto=47) / Raw(b"\0" * 8)),),
         drops={"unsupported_proto": 1}),
    # --- TCP connection reuse ------------------------------------------------------------------
    Case("SYN on a TIME_WAIT session opens a new session (next server)",
         (fwd(SYN, SYN_TO_S1), fwd(SYNACK_FROM_S1, SYNACK_FROM_VIP),
          fwd(ACK, tcp(CLIENT, S1, 40000, HTTP, "A", seq=1001, ack=5001)),
          fwd(tcp(CLIENT, VIP, 40000, 80, "FA", seq=1001, ack=5001),
              tcp(CLIENT, S1, 40000, HTTP, "FA", seq=1001, ack=5001)),
          fwd(tcp(S1, CLIENT, HTTP, 40000, "FA", seq=5001, ack=1002),
              tcp(VIP, CLIENT, 80, 40000, "FA", seq=5001, ack=1002)),
          fwd(tcp(CLIENT, VIP, 40000, 80, seq=2000), tcp(CLIENT, S2, 40000, HTTP, seq=2000))),
         check=_reuse_check),
    Case("a retransmitted SYN on a SYN_RECV session keeps it (same server)",
         (fwd(SYN, SYN_TO_S1), fwd(SYN, SYN_TO_S1)),
         check=_retransmit_check),
    # --- client-IP persistence ----------------------------------------------------------------
    Case("persistence: the same client reaches the same server across new flows",
         (fwd(syn_from(CLIENT, 1000), syn_to(CLIENT, 1000, S1)),
          fwd(syn_from(CLIENT, 1001), syn_to(CLIENT, 1001, S1)),
          fwd(syn_from(NEIGHBOUR, 1000), syn_to(NEIGHBOUR, 1000, S2)),
          fwd(syn_from(CLIENT, 1002), syn_to(CLIENT, 1002, S1))),
         config=lambda: make_config(persistence="client-ip")),
    Case("persistence netmask 24: clients of one /24 share a server, others do not",
         (fwd(syn_from(CLIENT, 1000), syn_to(CLIENT, 1000, S1)),
          fwd(syn_from(NEIGHBOUR, 1000), syn_to(NEIGHBOUR, 1000, S1)),
          fwd(syn_from(FAR, 1000), syn_to(FAR, 1000, S2))),
         config=lambda: make_config(persistence="client-ip", netmask=24)),
    Case("persistence: a bound server going down rebinds the client, for good",
         (fwd(syn_from(CLIENT, 1000), syn_to(CLIENT, 1000, S1)),
          down(S1),
          fwd(syn_from(CLIENT, 1001), syn_to(CLIENT, 1001, S2)),
          set_up(S1),
          fwd(syn_from(CLIENT, 1002), syn_to(CLIENT, 1002, S2))),
         config=lambda: make_config(persistence="client-ip"), check=_binding_moved_check),
    Case("persistence: a draining server keeps its bound clients, takes no new ones",
         (fwd(syn_from(CLIENT, 1000), syn_to(CLIENT, 1000, S1)),
          admin(S1, AdminState.DRAIN),
          fwd(syn_from(CLIENT, 1001), syn_to(CLIENT, 1001, S1)),
          fwd(syn_from(NEIGHBOUR, 1000), syn_to(NEIGHBOUR, 1000, S2))),
         config=lambda: make_config(persistence="client-ip")),
    Case("persistence: a disabled server's bound clients are rescheduled",
         (fwd(syn_from(CLIENT, 1000), syn_to(CLIENT, 1000, S1)),
          admin(S1, AdminState.DISABLED),
          fwd(syn_from(CLIENT, 1001), syn_to(CLIENT, 1001, S2))),
         config=lambda: make_config(persistence="client-ip")),
    # --- backup servers ------------------------------------------------------------------------
    Case("backup: takes no client while a primary is usable",
         (fwd(syn_from(CLIENT, 1000), syn_to(CLIENT, 1000, S1)),
          fwd(syn_from(CLIENT, 1001), syn_to(CLIENT, 1001, S2)),
          fwd(syn_from(CLIENT, 1002), syn_to(CLIENT, 1002, S1))),
         config=lambda: make_config(backups=(S3,))),
    Case("backup: takes the clients when no primary is usable, until one returns",
         (down(S1, S2),
          fwd(syn_from(CLIENT, 1000), syn_to(CLIENT, 1000, S3)),
          fwd(syn_from(CLIENT, 1001), syn_to(CLIENT, 1001, S3)),
          set_up(S2),
          fwd(syn_from(CLIENT, 1002), syn_to(CLIENT, 1002, S2)),
          # the session already on the backup stays there
          fwd(tcp(CLIENT, VIP, 1000, 80, "A", seq=1001, ack=1),
              tcp(CLIENT, S3, 1000, HTTP, "A", seq=1001, ack=1))),
         config=lambda: make_config(backups=(S3,))),
    Case("backup with persistence: a client bound to the backup moves back to a primary",
         (down(S1, S2),
          fwd(syn_from(CLIENT, 1000), syn_to(CLIENT, 1000, S3)),
          set_up(S1),
          fwd(syn_from(CLIENT, 1001), syn_to(CLIENT, 1001, S1))),
         config=lambda: make_config(persistence="client-ip", backups=(S3,))),
    # --- partial checksums and GSO (virtio_net_hdr NEEDS_CSUM) ----------------------------------
    Case("NEEDS_CSUM TCP GSO super-packet to the VIP: dst rewritten, L4 field = pseudo-header "
         "sum of the new addresses, vnet header (GSO) kept",
         (fwd(SYN, SYN_TO_S1),
          fwd(partial(BIG_ACK, CLIENT, VIP), partial(BIG_ACK_TO_S1, CLIENT, S1),
              PARTIAL_TCP_VNET)),
         counters={"packets_in": 2, "bytes_in": len(SYN) + len(BIG_ACK)}),
    Case("NEEDS_CSUM TCP GSO super-packet from the server: src rewritten to VIP:80",
         (fwd(SYN, SYN_TO_S1),
          fwd(partial(BIG_REPLY, S1, CLIENT), partial(BIG_REPLY_FROM_VIP, VIP, CLIENT),
              PARTIAL_TCP_VNET)),
         counters={"packets_out": 1, "bytes_out": len(BIG_REPLY)}),
    Case("NEEDS_CSUM UDP both ways",
         (fwd(partial(DNS_Q, CLIENT, VIP), partial(DNS_Q_TO_S1, CLIENT, S1), PARTIAL_UDP_VNET),
          fwd(partial(DNS_R_FROM_S1, S1, CLIENT), partial(DNS_R_FROM_VIP, VIP, CLIENT),
              PARTIAL_UDP_VNET))),
    # --- per-source limits (every step is one second after the one before) ------------------
    Case("a source at its concurrent limit: its next SYN is dropped, not answered; another "
         "source's goes through",
         (fwd(syn_from(CLIENT, 40000), syn_to(CLIENT, 40000, S1)),
          fwd(syn_from(CLIENT, 40001), syn_to(CLIENT, 40001, S2)),
          drop(syn_from(CLIENT, 40002)),  # (after rr's pick: S1's turn went by)
          fwd(syn_from(NEIGHBOUR, 40000), syn_to(NEIGHBOUR, 40000, S2))),
         drops={"source_conn_limit": 1}, counters={"resets_sent": 0},
         config=limited(max_conns_per_source=2), check=sessions_in(3)),
    Case("a session that closes no longer counts: the source's next SYN is taken",
         (fwd(syn_from(CLIENT, 40000), syn_to(CLIENT, 40000, S1)),
          fwd(ACK, ACK_TO_S1),
          fwd(tcp(CLIENT, VIP, 40000, 80, "R"), tcp(CLIENT, S1, 40000, HTTP, "R")),
          fwd(syn_from(CLIENT, 40001), syn_to(CLIENT, 40001, S2))),
         config=limited(max_conns_per_source=1), check=sessions_in(2)),
    Case("a burst of the rate limit passes, then one SYN per refill (2 per 10 s: 0.2/s)",
         tuple([fwd(syn_from(CLIENT, 40000), syn_to(CLIENT, 40000, S1)),
                fwd(syn_from(CLIENT, 40001), syn_to(CLIENT, 40001, S2))]
               + [drop(syn_from(CLIENT, 40002 + i)) for i in range(3)]
               + [fwd(syn_from(CLIENT, 40005), syn_to(CLIENT, 40005, S2))]),
         drops={"source_rate_limit": 3},
         config=limited(max_conn_rate_per_source=2, conn_rate_period="10s"),
         check=sessions_in(3)),
    Case("a UDP flow's first packet counts; its next ones pay nothing",
         (fwd(DNS_Q, DNS_Q_TO_S1),
          drop(udp(CLIENT, VIP, 33001, 53, b"query")),
          fwd(DNS_Q, DNS_Q_TO_S1)),
         drops={"source_conn_limit": 1}, config=limited(max_conns_per_source=1),
         check=sessions_in(1)),
    Case("a flow picked up mid-stream is an existing connection: not limited, not counted",
         (forwarded(syn_from(CLIENT, 40000)),
          forwarded(tcp(CLIENT, VIP, 40001, 80, "A")),
          drop(syn_from(CLIENT, 40002))),
         drops={"source_conn_limit": 1}, counters={"picked_up": 1},
         config=limited("maglev", max_conns_per_source=1), check=sessions_in(2)),
]


def recomputed(data: bytes) -> Packet:
    """The IPv4 packet in ``data`` re-parsed with every checksum scapy knows recomputed."""
    p = IP(data)
    for layer in (IP, TCP, UDP, ICMP):
        if p.haslayer(layer) and not (layer is UDP and p[UDP].chksum == 0):
            del p[layer].chksum
    return IP(bytes(p))


def assert_checksums_valid(data: bytes, l4: bool = True) -> None:
    got, want = IP(data), recomputed(data)
    assert got[IP].chksum == want[IP].chksum, "IPv4 header checksum"
    if not l4:
        return
    for layer in (TCP, UDP, ICMP):
        if got.haslayer(layer):
            assert got[layer].chksum == want[layer].chksum, layer.__name__


def describe(data: bytes) -> str:
    return f"vnet={data[:pk.VNET_HDR_LEN].hex()} {IP(data[pk.VNET_HDR_LEN:])!r}"


def run_steps(w: World, steps: Sequence[Step | Action]) -> None:
    for i, step in enumerate(steps):
        if not isinstance(step, Step):
            step(w)
            continue
        junk = b"\xee" * 64  # the shell reuses its buffer: bytes past ``end`` are stale
        buf = bytearray(step.packet + junk)
        end = len(step.packet)
        verdict = w.fwd.handle(buf, end, T0 + i)
        assert VERDICTS[verdict] == VERDICTS[step.verdict], f"step {i}"
        assert len(buf) == end + len(junk) and buf[end:] == junk, f"step {i}: wrote past end"
        if verdict == FORWARD:
            out = bytes(buf[:end])
        elif verdict == SEND:
            out = bytes(w.fwd.out[:w.fwd.out_len])
            assert buf[:end] == step.packet, f"step {i}: a SEND left the input alone"
        else:
            continue
        if step.out is not None:
            assert out == step.out, (f"step {i}:\n got {describe(out)}\nwant "
                                     f"{describe(step.out)}")
            partial_csum = out[0] & pk.VNET_F_NEEDS_CSUM
            assert_checksums_valid(out[pk.VNET_HDR_LEN:], l4=not partial_csum)


@pytest.mark.parametrize("case", CASES, ids=[c.description for c in CASES])
def test_forwarder_table(case: Case) -> None:
    w = make_world(case.config())
    run_steps(w, case.steps)
    assert w.fwd.drops == dict(case.drops)
    for name, value in case.counters.items():
        assert getattr(w.fwd, name) == value, name
    assert w.fwd.errors == 0
    if case.check is not None:
        case.check(w)


# Found by fuzzing (docs/fuzzing.md): a flow refused after scheduling had already bound or
# rebound its client's network, and a SYN replacing a closing session removed it even when the
# new session was then refused.

def _refused_changes_nothing(w: World, steps: Sequence[Step | Action], last: Step) -> None:
    run_steps(w, steps)
    before = (len(w.sessions), [(b.client_net, b.server) for b in w.persistence],
              [s.active for s in w.services.servers()])
    run_steps(w, [last])
    after = (len(w.sessions), [(b.client_net, b.server) for b in w.persistence],
             [s.active for s in w.services.servers()])
    assert after == before


def test_table_full_binds_no_new_client_network() -> None:
    w = make_world(make_config(persistence="client-ip", max_sessions=1))
    _refused_changes_nothing(w, [fwd(syn_from(CLIENT, 40000), syn_to(CLIENT, 40000, S1)),
                                 fwd(ACK, ACK_TO_S1)],  # established: no SYN evicts it
                             drop(syn_from(FAR, 40000)))
    assert w.fwd.drops == {"table_full": 1}


def test_table_full_leaves_a_binding_to_a_server_gone_down() -> None:
    w = make_world(make_config(persistence="client-ip", max_sessions=1))
    _refused_changes_nothing(
        w, [fwd(syn_from(CLIENT, 40000), syn_to(CLIENT, 40000, S1)), fwd(ACK, ACK_TO_S1),
            down(S1)],
        drop(syn_from(CLIENT, 40001)))
    assert [b.server.addr for b in w.persistence] == [ip_to_int(S1)]


def test_refused_syn_keeps_the_closing_session_it_would_replace() -> None:
    w = make_world()
    _refused_changes_nothing(
        w, [fwd(syn_from(CLIENT, 40000), syn_to(CLIENT, 40000, S1)),
            fwd(tcp(CLIENT, VIP, 40000, 80, "A"), tcp(CLIENT, S1, 40000, HTTP, "A")),
            fwd(tcp(CLIENT, VIP, 40000, 80, "R"), tcp(CLIENT, S1, 40000, HTTP, "R")),
            down(S1, S2)],
        send(syn_from(CLIENT, 40000), rst(VIP, CLIENT, 80, 40000, seq=0, ack=1001, flags="RA")))
    assert w.fwd.drops == {"no_server": 1}
    assert [s.tcp_state for s in w.sessions] == [TcpState.CLOSE]


def test_every_parse_verdict_has_a_malformed_case() -> None:
    """The table reaches each packet.Drop that parse() returns, under its lowercased name
    (the two ICMP-error verdicts are counted as icmp_bad / icmp_unsupported instead)."""
    icmp_only = {pk.Drop.NOT_ICMP_ERROR, pk.Drop.BAD_ICMP_INNER}
    wanted = {d.name.lower() for d in pk.Drop if d not in icmp_only}
    covered = {reason for c in CASES for reason in c.drops}
    assert wanted <= covered


def test_partial_checksum_is_the_pseudo_header_sum_of_the_new_addresses() -> None:
    """Spelled out once, independent of the table's helpers: the L4 field after the rewrite
    equals the pseudo-header partial sum of (client, server) and the vnet header is as read."""
    w = make_world()
    run_steps(w, [fwd(SYN, SYN_TO_S1)])
    l4_len = 20 + len(BULK)
    buf = bytearray(PARTIAL_TCP_VNET + partial(BIG_ACK, CLIENT, VIP))
    assert w.fwd.handle(buf, len(buf), T0 + 1) == FORWARD
    assert bytes(buf[:pk.VNET_HDR_LEN]) == PARTIAL_TCP_VNET
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = pk.vnet_header(buf)
    assert (flags, gso_type, hdr_len, gso_size) == (pk.VNET_F_NEEDS_CSUM, pk.VNET_GSO_TCPV4,
                                                    52, 1448)
    field_at = pk.VNET_HDR_LEN + csum_start + csum_offset
    (value,) = struct.unpack_from("!H", buf, field_at)
    want = pseudo(CLIENT, S1, pk.PROTO_TCP, l4_len)
    assert value % 0xFFFF == want % 0xFFFF
    assert IP(bytes(buf[pk.VNET_HDR_LEN:])).dst == S1


# --- properties ----------------------------------------------------------------------------------

VALID_FRAMES = [frame(p) for p in (
    SYN, ACK, SYNACK_FROM_S1, DNS_Q, DNS_R_FROM_S1, tcp(CLIENT, VIP, 40000, 81),
    IP(src=CLIENT, dst=VIP) / ICMP(type=8) / Raw(b"abcdefgh"),
    icmp_error(S1, CLIENT, bytes(DNS_Q_TO_S1)),
    icmp_error(ROUTER, CLIENT, bytes(SYN_TO_S1)[:28], code=4, nexthopmtu=1400),
    icmp_error(CLIENT, VIP, bytes(DNS_R_FROM_VIP)),
    icmp_error(CLIENT, VIP, bytes(SYNACK_FROM_VIP)),
)] + [PARTIAL_TCP_VNET + partial(BIG_ACK, CLIENT, VIP)[:200]]


def seeded_world() -> World:
    """A world with a TCP and a UDP session, so that mutations reach the session paths."""
    w = make_world(make_config(persistence="client-ip", max_sessions=4))
    run_steps(w, [fwd(SYN, SYN_TO_S1), fwd(DNS_Q, DNS_Q_TO_S1)])
    return w


@st.composite
def mutated_frames(draw: st.DrawFn) -> tuple[bytearray, int]:
    """A valid frame with random bytes changed, maybe cut or extended, in a larger buffer."""
    data = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    data = data[:cut] if draw(st.booleans()) else data
    data += draw(st.binary(max_size=16))
    end = len(data)
    return data + bytearray(draw(st.binary(max_size=32))), end


@st.composite
def random_frames(draw: st.DrawFn) -> tuple[bytearray, int]:
    data = bytearray(draw(st.binary(max_size=120)))
    end = draw(st.integers(0, len(data)))
    return data, end


def assert_verdict_sound(w: World, buf: bytearray, end: int, size: int, verdict: int) -> None:
    assert verdict in (DROP, FORWARD, SEND)
    assert len(buf) == size  # rewritten in place, never resized
    if verdict == SEND:
        assert pk.VNET_HDR_LEN < w.fwd.out_len <= len(w.fwd.out)
        assert_checksums_valid(bytes(w.fwd.out[pk.VNET_HDR_LEN:w.fwd.out_len]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(mutated_frames(), random_frames()), min_size=1, max_size=6))
def test_handle_never_raises(frames: list[tuple[bytearray, int]]) -> None:
    w = seeded_world()
    for i, (buf, end) in enumerate(frames):
        size = len(buf)
        verdict = w.fwd.handle(buf, end, T0 + 10 + i)
        assert_verdict_sound(w, buf, end, size, verdict)


@settings(max_examples=150, deadline=None)
@given(
    cport=st.integers(1, 0xFFFF),
    seq=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=64),
    client=st.integers(0x01000000, 0xDFFFFFFF),
    proto=st.sampled_from(["tcp", "udp"]),
)
def test_forwarded_packets_have_valid_checksums(cport: int, seq: int, payload: bytes,
                                                client: int, proto: str) -> None:
    """Any well-formed client packet and its server's answer come out with valid checksums
    and the right endpoints."""
    caddr = int_to_ip(client)
    if caddr == VIP:
        return
    w = make_world()
    if proto == "tcp":
        q = tcp(caddr, VIP, cport, 80, seq=seq, payload=payload)
        vport, rport = 80, HTTP
    else:
        q = udp(caddr, VIP, cport, 53, payload)
        vport, rport = 53, DNS
    buf = bytearray(frame(q))
    assert w.fwd.handle(buf, len(buf), T0) == FORWARD
    out = IP(bytes(buf[pk.VNET_HDR_LEN:]))
    assert (out.src, out.dst, out.sport, out.dport) == (caddr, S1, cport, rport)
    assert_checksums_valid(bytes(buf[pk.VNET_HDR_LEN:]))
    if proto == "tcp":
        r = tcp(S1, caddr, rport, cport, "SA", seq=seq ^ 0x5A5A5A5A, ack=(seq + 1) & 0xFFFFFFFF,
                payload=payload)
    else:
        r = udp(S1, caddr, rport, cport, payload)
    buf = bytearray(frame(r))
    assert w.fwd.handle(buf, len(buf), T0 + 1) == FORWARD
    back = IP(bytes(buf[pk.VNET_HDR_LEN:]))
    assert (back.src, back.dst, back.sport, back.dport) == (VIP, caddr, vport, cport)
    assert_checksums_valid(bytes(buf[pk.VNET_HDR_LEN:]))


def test_a_refused_syn_changes_no_table_and_takes_no_token() -> None:
    w = make_world(limited(max_conns_per_source=1, max_conn_rate_per_source=5)())
    _refused_changes_nothing(w, [fwd(syn_from(CLIENT, 40000), syn_to(CLIENT, 40000, S1))],
                             drop(syn_from(CLIENT, 40001)))
    (entry,) = [s.source for s in w.sessions]
    assert entry is not None and entry.conns == 1 and entry.tokens == 4.0


def test_new_limits_apply_from_the_next_syn_after_a_reload() -> None:
    w = make_world(limited(max_conns_per_source=1)())
    run_steps(w, [fwd(syn_from(CLIENT, 40000), syn_to(CLIENT, 40000, S1)),
                  drop(syn_from(CLIENT, 40001))])
    services = build_services(limited(max_conns_per_source=2)(), previous=w.services)
    w.fwd.set_services(services)
    run_steps(w, [fwd(syn_from(CLIENT, 40001), syn_to(CLIENT, 40001, S1))])  # a new rr
    off = build_services(limited()(), previous=services)
    assert all(svc.source_limits is None for svc in off.services)


def test_every_drop_reason_is_declared_so_metrics_show_it_from_zero() -> None:
    import inspect
    import re

    from lb import forwarder
    used = set(re.findall(r'(?:drop|_refuse)\([^)]*?"([a-z_]+)"\)', inspect.getsource(forwarder)))
    assert used and used <= set(forwarder.DROP_REASONS)
