"""Receipts, gossip topic handling and the payout ledger (issue 7).

A node signs a receipt for each request it serves (`sign_as_node`), the client
countersigns it (`countersign`), and ledgers verify, deduplicate and sum receipts into
payouts per epoch (`Ledger`), with Merkle roots and proofs anyone can check
(`verify_proof`). Everything public is re-exported here; the modules are private. The
`dbloom ledger` commands live in `dbloom.ledger._cli`, imported only by the CLI.
"""

from ._epochs import EpochProof as EpochProof
from ._epochs import InvalidProof as InvalidProof
from ._epochs import decode_epoch_proof as decode_epoch_proof
from ._epochs import epoch_of as epoch_of
from ._epochs import split_payout as split_payout
from ._epochs import verify_proof as verify_proof
from ._receipt import MAX_RECEIPT as MAX_RECEIPT
from ._receipt import ForgedReceipt as ForgedReceipt
from ._receipt import InflatedReceipt as InflatedReceipt
from ._receipt import MalformedReceipt as MalformedReceipt
from ._receipt import NodeReceipt as NodeReceipt
from ._receipt import Observed as Observed
from ._receipt import Receipt as Receipt
from ._receipt import ReceiptBody as ReceiptBody
from ._receipt import ReceiptError as ReceiptError
from ._receipt import Status as Status
from ._receipt import Terms as Terms
from ._receipt import compute_amount as compute_amount
from ._receipt import countersign as countersign
from ._receipt import decode_node_receipt as decode_node_receipt
from ._receipt import decode_receipt as decode_receipt
from ._receipt import disagreements as disagreements
from ._receipt import sign_as_node as sign_as_node
from ._receipt import tokens_digest as tokens_digest
from ._receipt import verify_receipt as verify_receipt
from ._store import DEFAULT_EPOCH_SECONDS as DEFAULT_EPOCH_SECONDS
from ._store import REJECTION_KINDS as REJECTION_KINDS
from ._store import ClientTotal as ClientTotal
from ._store import IngestResult as IngestResult
from ._store import Ledger as Ledger
from ._store import LedgerError as LedgerError
from ._store import OperatorPayout as OperatorPayout
from ._store import Outcome as Outcome
from ._store import Payouts as Payouts
from ._store import Summary as Summary
