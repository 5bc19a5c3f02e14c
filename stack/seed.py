"""Synthetic users: deterministic for a seed, loaded with COPY on the master."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
import uuid
from collections.abc import Iterator

import asyncpg

from users_backend.passwords import hash_password

from .names import (
    CITIES,
    FEMALE_FIRST_NAMES,
    INTERESTS,
    MALE_FIRST_NAMES,
    SURNAMES,
    feminine_surname,
)

# Every seeded user logs in with this password; one hash is shared so that
# seeding costs one KDF run, not one per user.
SEED_PASSWORD = "password"
COLUMNS = ("id", "first_name", "second_name", "birthdate", "biography", "city", "password_hash")
_FIRST_BIRTHDATE = dt.date(1950, 1, 1).toordinal()
_LAST_BIRTHDATE = dt.date(2007, 12, 31).toordinal()


def generate_users(count: int, seed: int) -> Iterator[tuple[object, ...]]:
    rng = random.Random(seed)
    password_hash = hash_password(SEED_PASSWORD, salt=rng.randbytes(16))
    for _ in range(count):
        user_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        surname = rng.choice(SURNAMES)
        if rng.random() < 0.5:
            first_name = rng.choice(MALE_FIRST_NAMES)
        else:
            first_name = rng.choice(FEMALE_FIRST_NAMES)
            surname = feminine_surname(surname)
        birthdate = dt.date.fromordinal(rng.randint(_FIRST_BIRTHDATE, _LAST_BIRTHDATE))
        city = rng.choice(CITIES)
        biography = "Интересы: " + ", ".join(rng.sample(INTERESTS, 3))
        yield (user_id, first_name, surname, birthdate, biography, city, password_hash)


async def load_users(conn: asyncpg.Connection, count: int, seed: int) -> None:
    await conn.copy_records_to_table("users", records=generate_users(count, seed), columns=COLUMNS)
    await conn.execute("ANALYZE users")


async def wait_for_replica(
    master: asyncpg.Connection, replica: asyncpg.Connection, timeout: float
) -> int:
    """Wait until the replica's initial sync is done and it holds every user; the count."""
    deadline = time.monotonic() + timeout
    expected = await master.fetchval("SELECT count(*) FROM users")
    while True:
        synced = await replica.fetchval(
            "SELECT bool_and(srsubstate = 'r') FROM pg_subscription_rel"
        )
        have = await replica.fetchval("SELECT count(*) FROM users")
        if synced and have >= expected:
            # Statistics are not replicated: without them the replica's planner
            # guesses, and the prefix search may miss its index.
            await replica.execute("ANALYZE users")
            return int(have)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the replica has {have} of {expected} users after {timeout:.0f}s"
                " (see its log under .stack/logs)"
            )
        await asyncio.sleep(0.2)
