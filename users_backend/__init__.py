"""The users REST service of the seed: aiohttp + asyncpg over a rw and a ro pool."""
