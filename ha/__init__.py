"""High availability for lbd: VRRPv3 election, address ownership and state sync."""

from lb.native import activate

# The compiled hot-path modules, when a fresh build of exactly this source exists (lb/native.py).
activate("ha", __path__)
