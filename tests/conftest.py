from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.stackctl import StackHandle, running_stack

# Enough rows that the planner prefers the name index, small enough to seed in a second.
SESSION_USERS = 20_000


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackHandle]:
    """One stack without proxies for the tests that only read and write through it."""
    with running_stack(tmp_path_factory.mktemp("stack"), users=SESSION_USERS) as handle:
        yield handle


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    from tests.test_compose_run import compose_drill_summary
    from tests.test_drill import drill_summary

    table = drill_summary(config)
    if table is not None:
        terminalreporter.section("the seed's failure drill, responses per step")
        terminalreporter.write_line(table)
    table = compose_drill_summary(config)
    if table is not None:
        terminalreporter.section("the seed's drill on docker-compose-balance.yml's containers")
        terminalreporter.write_line(table)
