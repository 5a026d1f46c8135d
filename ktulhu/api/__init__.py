"""What the integrator APIs (`/external/api/*`, `/v1/*`) share: callers, quota-paid generations, SSE."""
