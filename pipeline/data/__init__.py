"""Data stages: safe fetching, img2dataset's resizer, filters, tokenizing, prepare (Ray Data)."""
