"""A fleet simulator for load tests and demos: many simulated agents in one process.

It is a test tool, not an agent: it speaks the real wire contract (:mod:`agent.protocol`) and
imports nothing else from ``agent``. See :mod:`simulator.fleet`.
"""
