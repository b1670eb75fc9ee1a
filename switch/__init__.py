"""isoswitch service layer: the asyncio switch around the Cython core."""
