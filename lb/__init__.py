"""lbd: a userspace L4 load balancer (NAT over TUN) that runs as a VRRP pair."""

from lb.native import activate

# The compiled hot-path modules, when a fresh build of exactly this source exists (lb/native.py).
activate("lb", __path__)
