"""The second service behind the entry proxy: a stand-in for the rest of a system."""
