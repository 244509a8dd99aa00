"""What the tests share: helpers, the multi-rank launcher and the scenarios spawned ranks run.

Import each module by its full name (``from tests.support.dist_utils import run_ranks``); nothing is
re-exported here, so a reader sees where every helper lives.
"""
