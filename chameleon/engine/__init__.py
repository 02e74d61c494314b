"""The async front end and the synchronous engine core: requests in, outputs out."""
