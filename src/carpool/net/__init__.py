"""Linux plumbing shared by the daemons: netlink, raw sockets, ARP and NDP announcements."""
