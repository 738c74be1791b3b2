package kms

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// randBatchBytes is nil, empty or n random bytes, at random.
func randBatchBytes(r *rand.Rand) []byte {
	switch r.IntN(4) {
	case 0:
		return nil
	case 1:
		return []byte{}
	}
	b := make([]byte, 1+r.IntN(300))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// randRequests are a random DecryptBatchRequest and EncryptBatchRequest.
func randRequests(r *rand.Rand) (*kmsv1.DecryptBatchRequest, *kmsv1.EncryptBatchRequest) {
	d := &kmsv1.DecryptBatchRequest{Keyset: []string{"", "payments/ledger", "ключи/β"}[r.IntN(3)]}
	e := &kmsv1.EncryptBatchRequest{Keyset: d.Keyset}
	for range r.IntN(120) {
		d.Items = append(d.Items, &kmsv1.DecryptItem{Ciphertext: randBatchBytes(r), AssociatedData: randBatchBytes(r)})
		e.Items = append(e.Items, &kmsv1.EncryptItem{Plaintext: randBatchBytes(r), AssociatedData: randBatchBytes(r)})
	}
	return d, e
}

// decodeBoth decodes b with the batch codec and with proto.Unmarshal into
// new messages of m's type.
func decodeBoth(t *testing.T, b []byte, m proto.Message) (fast, std proto.Message, fastErr, stdErr error) {
	t.Helper()
	fast, std = m.ProtoReflect().New().Interface(), m.ProtoReflect().New().Interface()
	fastErr = newBatchCodec().Unmarshal(mem.BufferSlice{mem.SliceBuffer(bytes.Clone(b))}, fast)
	stdErr = proto.Unmarshal(b, std)
	return fast, std, fastErr, stdErr
}

// TestBatchCodecDecodesAsProtobuf: batch requests decode to what protobuf
// decodes, for random requests and for encodings the fast path leaves to
// protobuf (unknown fields, other wire types, bad UTF-8, truncation).
func TestBatchCodecDecodesAsProtobuf(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 300 {
		d, e := randRequests(r)
		for _, m := range []proto.Message{d, e} {
			b, err := proto.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			fast, std, fastErr, stdErr := decodeBoth(t, b, m)
			if fastErr != nil || stdErr != nil || !proto.Equal(fast, m) || !proto.Equal(std, m) {
				t.Fatalf("case %d %T: codec = %v, %v; protobuf = %v, %v; want both equal to the original", i, m, fast, fastErr, std, stdErr)
			}
		}
	}

	d := &kmsv1.DecryptBatchRequest{Keyset: "k", Items: []*kmsv1.DecryptItem{{Ciphertext: []byte("ct"), AssociatedData: []byte("ad")}}}
	good, _ := proto.Marshal(d)
	item, _ := proto.Marshal(d.Items[0])
	unknownItem := protowire.AppendTag(bytes.Clone(item), 9, protowire.VarintType)
	unknownItem = protowire.AppendVarint(unknownItem, 7)
	for _, c := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"unknown top-level field", protowire.AppendVarint(protowire.AppendTag(bytes.Clone(good), 7, protowire.VarintType), 1)},
		{"unknown item field", protowire.AppendBytes(protowire.AppendTag(nil, fieldItems, protowire.BytesType), unknownItem)},
		{"keyset as a varint", protowire.AppendVarint(protowire.AppendTag(nil, fieldKeyset, protowire.VarintType), 3)},
		{"keyset not UTF-8", protowire.AppendBytes(protowire.AppendTag(nil, fieldKeyset, protowire.BytesType), []byte{0xff, 0xfe})},
		{"truncated", good[:len(good)-1]},
		{"length past the end", append(protowire.AppendTag(nil, fieldItems, protowire.BytesType), 0x7f)},
		{"field number 0", []byte{0x02, 0x00}},
		{"keyset twice (last wins)", protowire.AppendString(protowire.AppendTag(bytes.Clone(good), fieldKeyset, protowire.BytesType), "second")},
	} {
		for _, m := range []proto.Message{&kmsv1.DecryptBatchRequest{}, &kmsv1.EncryptBatchRequest{}} {
			fast, std, fastErr, stdErr := decodeBoth(t, c.b, m)
			if (fastErr == nil) != (stdErr == nil) || (stdErr == nil && !proto.Equal(fast, std)) {
				t.Errorf("%s, %T: codec = %v, %v; protobuf = %v, %v", c.name, m, fast, fastErr, std, stdErr)
			}
		}
	}
}

// FuzzBatchCodec: on any input, the batch codec and protobuf agree.
func FuzzBatchCodec(f *testing.F) {
	r := rand.New(rand.NewPCG(3, 4))
	for range 8 {
		d, _ := randRequests(r)
		b, _ := proto.Marshal(d)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, m := range []proto.Message{&kmsv1.DecryptBatchRequest{}, &kmsv1.EncryptBatchRequest{}} {
			fast, std, fastErr, stdErr := decodeBoth(t, b, m)
			if (fastErr == nil) != (stdErr == nil) || (stdErr == nil && !proto.Equal(fast, std)) {
				t.Fatalf("%T: codec = %v, %v; protobuf = %v, %v", m, fast, fastErr, std, stdErr)
			}
		}
	})
}

// TestBatchCodecEncodesAsProtobuf: batch responses encode byte for byte as
// proto.Marshal encodes them, with every kind of result.
func TestBatchCodecEncodesAsProtobuf(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for i := range 300 {
		d := &kmsv1.DecryptBatchResponse{MaxItems: []uint32{0, 1000, 1 << 31}[r.IntN(3)]}
		e := &kmsv1.EncryptBatchResponse{MaxItems: d.MaxItems}
		for range r.IntN(120) {
			keyID := []uint32{0, 1, 0xdeadbeef}[r.IntN(3)]
			itemErr := []*kmsv1.ItemError{nil, {}, {Code: 3, Message: "keyset \"x\": ciphertext does not decrypt"}, {Code: 16}}[r.IntN(4)]
			switch r.IntN(5) {
			case 0:
				d.Results = append(d.Results, &kmsv1.DecryptResult{})
				e.Results = append(e.Results, &kmsv1.EncryptResult{})
			case 1:
				d.Results = append(d.Results, &kmsv1.DecryptResult{Result: &kmsv1.DecryptResult_Error{Error: itemErr}})
				e.Results = append(e.Results, &kmsv1.EncryptResult{Result: &kmsv1.EncryptResult_Error{Error: itemErr}})
			case 2:
				d.Results = append(d.Results, &kmsv1.DecryptResult{Result: &kmsv1.DecryptResult_Ok{}})
				e.Results = append(e.Results, &kmsv1.EncryptResult{Result: &kmsv1.EncryptResult_Ok{}})
			default:
				data := randBatchBytes(r)
				d.Results = append(d.Results, &kmsv1.DecryptResult{Result: &kmsv1.DecryptResult_Ok{Ok: &kmsv1.DecryptResponse{Plaintext: data, KeyId: keyID}}})
				e.Results = append(e.Results, &kmsv1.EncryptResult{Result: &kmsv1.EncryptResult_Ok{Ok: &kmsv1.EncryptResponse{Ciphertext: data, KeyId: keyID}}})
			}
		}
		for _, m := range []proto.Message{d, e} {
			want, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			got, err := newBatchCodec().Marshal(m)
			if err != nil {
				t.Fatalf("case %d %T: Marshal = %v", i, m, err)
			}
			if b := got.Materialize(); !bytes.Equal(b, want) {
				t.Fatalf("case %d %T: codec encodes %d bytes %x, protobuf %d bytes %x", i, m, len(b), b, len(want), want)
			}
			got.Free()
		}
	}
}

// TestBatchCodecAllocations: a 100-item batch request decodes in a fixed
// handful of allocations (the frame's copy, the items, the item pointers,
// the keyset name, and the test's own message and buffer slice), not three
// per item as protobuf's.
func TestBatchCodecAllocations(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	d := &kmsv1.DecryptBatchRequest{Keyset: "payments/ledger"}
	for range 100 {
		d.Items = append(d.Items, &kmsv1.DecryptItem{Ciphertext: randBatchBytes(r), AssociatedData: randBatchBytes(r)})
	}
	b, _ := proto.Marshal(d)
	c := newBatchCodec()
	allocs := testing.AllocsPerRun(50, func() {
		var m kmsv1.DecryptBatchRequest
		if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(b)}, &m); err != nil || len(m.Items) != 100 {
			t.Fatalf("Unmarshal = %d items, %v", len(m.Items), err)
		}
	})
	if allocs > 8 {
		t.Errorf("decoding a 100-item batch: %.0f allocations, want at most 8", allocs)
	}
}
