"""Machinery shared by the ops: chunking, segment masks, the recurrent driver, chunk state passing."""
