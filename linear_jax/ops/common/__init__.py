"""Machinery shared by the ops: chunking, document masks, span sums, the recurrent driver."""
