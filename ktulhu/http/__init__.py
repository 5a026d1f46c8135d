"""HTTP and WebSocket surfaces, one blueprint module each."""
