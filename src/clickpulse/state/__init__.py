"""Per-user state in event time: windows, session, cart, lifetime; watermarks and timers."""
