"""dbloom attestation: evidence, verifiers, policy, measurement, posture and `/dbloom/attest`.

A client checks a node's evidence itself, against its own policy, before any prompt
leaves its machine. Everything public is re-exported here; the modules are private.
"""

from ._appattest import AppAttestVerifier as AppAttestVerifier
from ._apple_helper import AppleHelperProvider as AppleHelperProvider
from ._apple_roots import production_roots as production_roots
from ._client import Attestor as Attestor
from ._client import challenge as challenge
from ._dev import DevVerifier as DevVerifier
from ._errors import AttestationError as AttestationError
from ._errors import AttestationRefused as AttestationRefused
from ._errors import EvidenceDecodeError as EvidenceDecodeError
from ._evidence import Claims as Claims
from ._evidence import Evidence as Evidence
from ._evidence import Posture as Posture
from ._evidence import claims_digest as claims_digest
from ._evidence import decode_claims as decode_claims
from ._evidence import decode_evidence as decode_evidence
from ._kinds import KindResult as KindResult
from ._kinds import Verifier as Verifier
from ._kinds import VerifierState as VerifierState
from ._kinds import VerifyContext as VerifyContext
from ._mda import MdaVerifier as MdaVerifier
from ._mda import mda_nonce as mda_nonce
from ._measure import Measurement as Measurement
from ._measure import measure_software as measure_software
from ._node import DevProvider as DevProvider
from ._node import EvidenceProvider as EvidenceProvider
from ._node import NodeAttester as NodeAttester
from ._node import serve_attest as serve_attest
from ._policy import HARDWARE_KINDS as HARDWARE_KINDS
from ._policy import Policy as Policy
from ._policy import Verdict as Verdict
from ._policy import verify_evidence as verify_evidence
from ._posture import harden_process as harden_process
from ._posture import read_posture as read_posture
from ._protocol import PROTOCOL_ID as PROTOCOL_ID
from ._refusal import Reason as Reason
from ._refusal import Refusal as Refusal
from ._registry import default_verifiers as default_verifiers
from ._tpm import TpmVerifier as TpmVerifier
from ._tpm import quoted_pcrs as quoted_pcrs
from ._tpm_collect import AttestationKey as AttestationKey
from ._tpm_collect import TpmProvider as TpmProvider
from ._tpm_collect import create_ak as create_ak
