"""lbd: a userspace L4 load balancer (NAT over TUN) that runs as a VRRP pair."""
