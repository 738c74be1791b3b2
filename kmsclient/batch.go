package kmsclient

import (
	"context"
	"fmt"
	"math"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// DefaultServerMaxBatch is the number of items a KMS accepts in one batch
// unless configured otherwise (kms.Config.MaxBatch). A larger batch is
// refused as a whole with InvalidArgument naming the server's limit, and is
// not retried; the client does not know a server's limit and does not split
// batches.
const DefaultServerMaxBatch = 1000

// BatchItem is one item of a batch: a plaintext (EncryptBatch) or a
// ciphertext (DecryptBatch), with its associated data.
type BatchItem struct {
	Data           []byte
	AssociatedData []byte
}

// BatchResult is the outcome of one item of a batch: its ciphertext
// (EncryptBatch) or plaintext (DecryptBatch, never nil on success: the empty
// plaintext is empty, not nil), and the Tink key ID of the key version
// used; or Err, a gRPC status error (status.Code works) naming the item,
// with Data nil.
type BatchResult struct {
	Data  []byte
	KeyID uint32
	Err   error
}

// EncryptBatch encrypts items with the keyset's primary key version in one
// call to the AEAD's region, and returns one result per item, in order.
// Each item succeeds or fails on its own (an item over the server's size
// limit fails alone); the error is for the call as a whole (refused, or no
// answer), and then there are no results.
//
// The call has Encrypt's deadline, failover and retry rules (see the
// package documentation), with one difference: a batch that was answered is
// never retried, whatever its items say, and a batch is retried as a whole
// only when no answer came (Unavailable, an attempt's DeadlineExceeded, or
// a ResourceExhausted carrying the KMS's retry hint, which the KMS sends
// when it sheds the call before reading it). A ResourceExhausted without a
// hint (a gRPC message-size limit) is returned at once. Redoing a batch is
// safe: a KMS call changes no state but its audit log.
//
// An item over WithMaxPayload refuses the whole batch before any call, with
// InvalidArgument naming the item. A batch over the server's item limit
// (DefaultServerMaxBatch unless configured) is refused by the server with
// InvalidArgument. An empty batch makes no call and returns no results.
func (a *AEAD) EncryptBatch(ctx context.Context, items []BatchItem) ([]BatchResult, error) {
	if len(items) == 0 {
		return []BatchResult{}, nil
	}
	size, err := a.checkBatch(opEncryptBatch, items, 0)
	if err != nil {
		return nil, err
	}
	backing := make([]kmsv1.EncryptItem, len(items))
	req := &kmsv1.EncryptBatchRequest{Keyset: a.keyset, Items: make([]*kmsv1.EncryptItem, len(items))}
	for i, it := range items {
		backing[i].Plaintext, backing[i].AssociatedData = it.Data, it.AssociatedData
		req.Items[i] = &backing[i]
	}
	recv := grpc.MaxCallRecvMsgSize(batchRecvLimit(size, len(items)))
	var results []*kmsv1.EncryptResult
	err = a.c.call(ctx, opEncryptBatch, a.region, a.keyset, func(ctx context.Context, kms kmsv1.KMSClient, _ *region) error {
		resp, err := kms.EncryptBatch(ctx, req, recv)
		if err != nil {
			return err
		}
		if got := len(resp.GetResults()); got != len(items) {
			return status.Errorf(codes.Internal, "the KMS answered %d results for %d items", got, len(items))
		}
		results = resp.GetResults()
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]BatchResult, len(items))
	for i, r := range results {
		switch {
		case r.GetOk() != nil && len(r.GetOk().GetCiphertext()) > 0:
			out[i] = BatchResult{Data: r.GetOk().GetCiphertext(), KeyID: r.GetOk().GetKeyId()}
		case r.GetError() != nil:
			out[i].Err = a.itemError(opEncryptBatch, i, r.GetError())
		default:
			out[i].Err = status.Errorf(codes.Internal, "kmsclient: %s item %d with keyset %q in region %s: the KMS answered with neither a ciphertext nor an error",
				opEncryptBatch, i, a.keyset, a.region.name)
		}
	}
	return out, nil
}

// DecryptBatch decrypts items in one call and returns one result per item,
// in order. A ciphertext that does not decrypt fails alone with
// InvalidArgument. The call has Decrypt's deadline, failover and retry
// rules, including the region's decrypt fallbacks (WithDecryptFallback),
// with EncryptBatch's difference: only a batch that brought no answer is
// retried, as a whole.
//
// When a fallback region answered the batch (the AEAD's region having
// failed), an item that region could not decrypt is no verdict on the
// ciphertext (the region may not hold its key version yet), as with
// Decrypt: the item fails with Unavailable, its message naming what the
// fallback region said; the other items are that region's plaintexts.
func (a *AEAD) DecryptBatch(ctx context.Context, items []BatchItem) ([]BatchResult, error) {
	if len(items) == 0 {
		return []BatchResult{}, nil
	}
	size, err := a.checkBatch(opDecryptBatch, items, ciphertextOverhead)
	if err != nil {
		return nil, err
	}
	backing := make([]kmsv1.DecryptItem, len(items))
	req := &kmsv1.DecryptBatchRequest{Keyset: a.keyset, Items: make([]*kmsv1.DecryptItem, len(items))}
	for i, it := range items {
		backing[i].Ciphertext, backing[i].AssociatedData = it.Data, it.AssociatedData
		req.Items[i] = &backing[i]
	}
	recv := grpc.MaxCallRecvMsgSize(batchRecvLimit(size, len(items)))
	var results []*kmsv1.DecryptResult
	var answered *region
	err = a.c.call(ctx, opDecryptBatch, a.region, a.keyset, func(ctx context.Context, kms kmsv1.KMSClient, reg *region) error {
		resp, err := kms.DecryptBatch(ctx, req, recv)
		if err != nil {
			return err
		}
		if got := len(resp.GetResults()); got != len(items) {
			return status.Errorf(codes.Internal, "the KMS answered %d results for %d items", got, len(items))
		}
		results, answered = resp.GetResults(), reg
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]BatchResult, len(items))
	for i, r := range results {
		switch {
		case r.GetOk() != nil:
			pt := r.GetOk().GetPlaintext()
			if pt == nil {
				pt = []byte{} // the empty plaintext (see DecryptWithContext)
			}
			out[i] = BatchResult{Data: pt, KeyID: r.GetOk().GetKeyId()}
		case r.GetError() != nil && answered != a.region:
			ie := r.GetError()
			out[i].Err = status.Errorf(codes.Unavailable, "kmsclient: %s item %d with keyset %q: region %s is unavailable, and its decrypt fallback region %s refused the item: %s: %s",
				opDecryptBatch, i, a.keyset, a.region.name, answered.name, itemCode(ie), truncate(ie.GetMessage()))
		case r.GetError() != nil:
			out[i].Err = a.itemError(opDecryptBatch, i, r.GetError())
		default:
			out[i].Err = status.Errorf(codes.Internal, "kmsclient: %s item %d with keyset %q in region %s: the KMS answered with neither a plaintext nor an error",
				opDecryptBatch, i, a.keyset, a.region.name)
		}
	}
	return out, nil
}

// checkBatch checks every item's sizes as checkSizes does, and returns the
// items' total size.
func (a *AEAD) checkBatch(o op, items []BatchItem, overhead int) (int, error) {
	total, limit := 0, a.c.opts.maxPayload
	for i, it := range items {
		if len(it.Data) > limit+overhead || len(it.AssociatedData) > limit {
			return 0, a.checkSizes(o, fmt.Sprintf("item %d's data", i), it.Data, overhead, it.AssociatedData)
		}
		total += len(it.Data) + len(it.AssociatedData)
	}
	return total, nil
}

// batchRecvLimit bounds the answer to a batch whose items total size bytes:
// it cannot be much larger than the request (a ciphertext adds at most
// ciphertextOverhead to its plaintext; an item's error message is short),
// and may be larger than gRPC's default 4 MiB, which a batch near the
// server's request limit would exceed.
func batchRecvLimit(size, items int) int {
	const base = 4 << 20
	n := int64(base) + int64(size) + int64(items)*int64(ciphertextOverhead+512)
	return int(min(n, math.MaxInt32))
}

// itemCode is an item error's code (Unknown if it is not a gRPC code or
// is OK, which an error cannot be).
func itemCode(ie *kmsv1.ItemError) codes.Code {
	c := ie.GetCode()
	if c == 0 || c > uint32(codes.Unauthenticated) {
		return codes.Unknown
	}
	return codes.Code(c)
}

// itemError is the error of a batch item the KMS refused, with the KMS's
// code.
func (a *AEAD) itemError(o op, i int, ie *kmsv1.ItemError) error {
	return status.Errorf(itemCode(ie), "kmsclient: %s item %d with keyset %q in region %s: %s",
		o, i, a.keyset, a.region.name, truncate(ie.GetMessage()))
}
