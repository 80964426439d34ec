"""What both ends of a kpcast call agree on: wire protocol, signaling, ICE set-up. No torch here."""
