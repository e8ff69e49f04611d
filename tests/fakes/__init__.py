"""Wire-level test peers that real SDKs connect to (not products; see each module)."""
