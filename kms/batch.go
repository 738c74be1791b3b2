package kms

import (
	"fmt"
	"strconv"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/kms/keystore"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// A batch response is built in a fixed number of allocations, whatever its
// number of items: one slice of result slots (each slot holds a result, its
// oneof wrapper and its response message, pointed into), one slice of
// pointers to the results, and one buffer that every item's output is
// carved from. Only a failed item allocates (its ItemError).

// Machine-readable parts of a batch's over-limit refusal (documented in
// kms.proto).
const (
	batchLimitReason = "BATCH_TOO_LARGE"
	batchLimitDomain = "cairn.kms.v1"
)

// batchTooLarge is the refusal of a batch of n items, more than the
// server's limit: INVALID_ARGUMENT with the limit in the message, in a
// google.rpc.ErrorInfo (metadata max_items and items) and in a
// google.rpc.BadRequest on the field "items". The codec gives it before
// decoding a batch (see dataRequest), the handlers to a batch that did not
// come through it (the transit API's).
func batchTooLarge(n, limit int) error {
	msg := fmt.Errorf("%w: %d items, more than the limit of %d", errInvalid, n, limit).Error()
	st, err := status.New(codes.InvalidArgument, msg).WithDetails(
		&errdetails.ErrorInfo{Reason: batchLimitReason, Domain: batchLimitDomain, Metadata: map[string]string{
			"max_items": strconv.Itoa(limit), "items": strconv.Itoa(n)}},
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{
			Field: "items", Reason: batchLimitReason, Description: fmt.Sprintf("at most %d items per batch", limit)}}},
	)
	if err != nil { // the details are well-formed: not expected
		return status.Error(codes.InvalidArgument, msg)
	}
	return st.Err()
}

// maxItems is the batch limit as the responses report it.
func (s *Server) maxItems() uint32 { return uint32(min(s.cfg.MaxBatch, int(^uint32(0)))) }

// encryptSlot is one item's share of an EncryptBatch response.
type encryptSlot struct {
	res  kmsv1.EncryptResult
	ok   kmsv1.EncryptResult_Ok
	resp kmsv1.EncryptResponse
}

// encryptResults is an EncryptBatch response of n items, results unset,
// with a buffer to carve ciphertexts from sized for items' plaintexts under
// AES-GCM (a larger ciphertext just grows it).
func encryptResults(items []*kmsv1.EncryptItem) (*kmsv1.EncryptBatchResponse, []encryptSlot, []byte) {
	size := 0
	for _, it := range items {
		size += len(it.GetPlaintext()) + keystore.AESGCMOverhead
	}
	return &kmsv1.EncryptBatchResponse{Results: make([]*kmsv1.EncryptResult, len(items))}, make([]encryptSlot, len(items)), make([]byte, 0, size)
}

// decryptSlot is one item's share of a DecryptBatch response.
type decryptSlot struct {
	res  kmsv1.DecryptResult
	ok   kmsv1.DecryptResult_Ok
	resp kmsv1.DecryptResponse
}

// decryptResults is a DecryptBatch response of n items, results unset,
// with a buffer to carve plaintexts from sized for items' ciphertexts under
// AES-GCM (a plaintext of another key type is shorter than that).
func decryptResults(items []*kmsv1.DecryptItem) (*kmsv1.DecryptBatchResponse, []decryptSlot, []byte) {
	size := 0
	for _, it := range items {
		size += max(len(it.GetCiphertext())-keystore.AESGCMOverhead, 0)
	}
	return &kmsv1.DecryptBatchResponse{Results: make([]*kmsv1.DecryptResult, len(items))}, make([]decryptSlot, len(items)), make([]byte, 0, size)
}

// carve returns buf[from:] with its capacity cut to its length, so that
// appending to one item's output can never overwrite the next one's.
func carve(buf []byte, from int) []byte { return buf[from:len(buf):len(buf)] }
