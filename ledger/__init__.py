"""Receipts, gossip topic handling and the payout ledger (issue 7)."""
