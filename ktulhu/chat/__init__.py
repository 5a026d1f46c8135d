"""The chat surface behind `/ws`: frames, sessions, the prompt flow, access rules and summaries."""
