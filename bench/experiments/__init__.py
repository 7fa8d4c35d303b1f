"""One-off measurements kept for the record of how docs/BENCHMARKS.md got some of its figures.

Not maintained and not tested: they patch private parts of service/ and may break with any
change there. See README.md in this folder.
"""
