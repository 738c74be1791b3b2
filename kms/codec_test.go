package kms

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"runtime"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
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
	fastErr = newBatchCodec(DefaultMaxDataMsgSize, DefaultMaxBatch).Unmarshal(mem.BufferSlice{mem.SliceBuffer(bytes.Clone(b))}, fast)
	stdErr = proto.Unmarshal(b, std)
	// The count the batch limit is checked against is protobuf's number of
	// items, however gRPC split the frame into buffers.
	if stdErr == nil {
		if n, want := countField(split(b, 3), fieldItems), std.ProtoReflect().Get(std.ProtoReflect().Descriptor().Fields().ByNumber(fieldItems)).List().Len(); n != want {
			t.Errorf("%T %x: countField = %d, protobuf decodes %d items", m, b, n, want)
		}
	}
	return fast, std, fastErr, stdErr
}

// split is b in buffers of n bytes (the last one shorter).
func split(b []byte, n int) mem.BufferSlice {
	var out mem.BufferSlice
	for len(b) > 0 {
		k := min(n, len(b))
		out, b = append(out, mem.SliceBuffer(b[:k])), b[k:]
	}
	return out
}

// emptyItems is a request of n empty elements of the repeated message field
// num: two bytes each, the most elements a request of its size holds.
func emptyItems(num protowire.Number, n int) []byte {
	b := make([]byte, 0, 2*n)
	for range n {
		b = protowire.AppendTag(b, num, protowire.BytesType)
		b = protowire.AppendVarint(b, 0)
	}
	return b
}

// TestDataRequestLimits: the codec refuses a data-plane request over the
// data plane's limits without decoding any of it, with the handlers'
// refusal: a batch of MaxBatch+1 items (EncryptBatch, DecryptBatch) or
// probes (Probe) with INVALID_ARGUMENT, also when gRPC received it in many
// buffers; a request larger than MaxDataMsgSize with RESOURCE_EXHAUSTED.
// A batch of MaxBatch items decodes.
func TestDataRequestLimits(t *testing.T) {
	const maxMsg, maxBatch = 1 << 10, 10
	c := newBatchCodec(maxMsg, maxBatch)
	for _, tc := range []struct {
		method string
		msg    func() proto.Message
		field  protowire.Number
		want   string
	}{
		{"EncryptBatch", func() proto.Message { return new(kmsv1.EncryptBatchRequest) }, fieldItems, "kms: invalid request: 11 items, more than the limit of 10"},
		{"DecryptBatch", func() proto.Message { return new(kmsv1.DecryptBatchRequest) }, fieldItems, "kms: invalid request: 11 items, more than the limit of 10"},
		{"Probe", func() proto.Message { return new(kmsv1.ProbeRequest) }, fieldProbes, "kms: invalid request: 11 probes, more than the limit of 10"},
	} {
		decode := func(data mem.BufferSlice) *dataRequest {
			t.Helper()
			r := &dataRequest{method: tc.method, msg: tc.msg()}
			if err := c.Unmarshal(data, r); err != nil {
				t.Fatalf("%s: Unmarshal = %v, want nil (a refusal is the request's, not an error)", tc.method, err)
			}
			return r
		}
		items := func(m proto.Message) int {
			return m.ProtoReflect().Get(m.ProtoReflect().Descriptor().Fields().ByNumber(tc.field)).List().Len()
		}
		over := emptyItems(tc.field, maxBatch+1)
		for _, data := range []mem.BufferSlice{split(over, len(over)), split(over, 1)} {
			r := decode(data)
			st := status.Convert(r.refused)
			if st.Code() != codes.InvalidArgument || st.Message() != tc.want || r.kind != shedItems {
				t.Errorf("%s of %d items in %d buffers: refused %v %q (counted as %v), want InvalidArgument %q (%v)",
					tc.method, maxBatch+1, len(data), st.Code(), st.Message(), shedNames[r.kind], tc.want, shedNames[shedItems])
			}
			if n := items(r.msg); n != 0 {
				t.Errorf("%s of %d items: %d decoded, want none", tc.method, maxBatch+1, n)
			}
		}
		if r := decode(split(emptyItems(tc.field, maxBatch), 1)); r.refused != nil || items(r.msg) != maxBatch {
			t.Errorf("%s of %d items = %d items, refused %v; want every item, not refused", tc.method, maxBatch, items(r.msg), r.refused)
		}
		item := protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType), make([]byte, maxMsg))
		big := protowire.AppendBytes(protowire.AppendTag(nil, tc.field, protowire.BytesType), item)
		r := decode(split(big, len(big)))
		want := fmt.Sprintf("kms: the %s request is %d bytes, more than the data plane's limit of %d bytes: split it into smaller calls (only ApplyBundle takes larger requests)",
			tc.method, len(big), maxMsg)
		if st := status.Convert(r.refused); st.Code() != codes.ResourceExhausted || st.Message() != want || r.kind != shedSize || items(r.msg) != 0 {
			t.Errorf("%s of %d bytes: refused %v %q (counted as %v), %d items decoded; want ResourceExhausted %q (%v), none decoded",
				tc.method, len(big), st.Code(), st.Message(), shedNames[r.kind], items(r.msg), want, shedNames[shedSize])
		}
	}
}

// TestDataRequestRefusalAllocations: refusing a batch of too many items
// takes the refusal's few allocations and bytes whatever the request's
// size: a request of MaxDataMsgSize bytes of empty items (two million) is
// neither copied nor decoded (which took ~48 times its size).
func TestDataRequestRefusalAllocations(t *testing.T) {
	c := newBatchCodec(DefaultMaxDataMsgSize, DefaultMaxBatch)
	for _, tc := range []struct {
		method string
		msg    func() proto.Message
		field  protowire.Number
	}{
		{"DecryptBatch", func() proto.Message { return new(kmsv1.DecryptBatchRequest) }, fieldItems},
		{"EncryptBatch", func() proto.Message { return new(kmsv1.EncryptBatchRequest) }, fieldItems},
		{"Probe", func() proto.Message { return new(kmsv1.ProbeRequest) }, fieldProbes},
	} {
		b := emptyItems(tc.field, DefaultMaxDataMsgSize/2)
		data := split(b, 16<<10) // as gRPC receives it: in HTTP/2 frames
		refuse := func() {
			r := dataRequest{method: tc.method, msg: tc.msg()}
			if err := c.Unmarshal(data, &r); err != nil || status.Code(r.refused) != codes.InvalidArgument {
				t.Fatalf("%s of %d empty items = %v, refused %v; want refused with InvalidArgument", tc.method, len(b)/2, err, r.refused)
			}
		}
		if n := testing.AllocsPerRun(5, refuse); n > 64 {
			t.Errorf("%s: refusing %d items: %.0f allocations, want at most 64", tc.method, len(b)/2, n)
		}
		const runs = 5
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for range runs {
			refuse()
		}
		runtime.ReadMemStats(&after)
		if per := (after.TotalAlloc - before.TotalAlloc) / runs; per > 16<<10 {
			t.Errorf("%s: refusing a %d-byte request of %d items allocated %d bytes, want at most 16 KiB", tc.method, len(b), len(b)/2, per)
		}
	}
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
		{"item in an unknown group", protowire.AppendTag(protowire.AppendBytes(protowire.AppendTag(protowire.AppendTag(nil, 7, protowire.StartGroupType), fieldItems, protowire.BytesType), item), 7, protowire.EndGroupType)},
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
			got, err := newBatchCodec(DefaultMaxDataMsgSize, DefaultMaxBatch).Marshal(m)
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
	c := newBatchCodec(DefaultMaxDataMsgSize, DefaultMaxBatch)
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
