"""Everything durable on the booking side, behind one protocol."""
