"""High availability for lbd: VRRPv3 election, address ownership and state sync."""
