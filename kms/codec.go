package kms

import (
	"unicode/utf8"

	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// batchCodec is the KMS server's gRPC codec: the standard protobuf codec,
// except for the batch messages, whose generic encoding costs three heap
// objects and a reflective walk per item, each way.
//
//   - An EncryptBatchRequest or DecryptBatchRequest is decoded from one copy
//     of its frame into one slice of items, their byte fields pointing into
//     that copy: three allocations for the whole batch. Anything the fast
//     decoder does not expect (an unknown field, an unexpected wire type, a
//     keyset name that is not UTF-8, a malformed frame) is left to
//     proto.Unmarshal, so what is accepted and refused, and every error, is
//     exactly protobuf's.
//   - An EncryptBatchResponse or DecryptBatchResponse is encoded by hand
//     into one buffer, byte for byte what proto.Marshal gives (a test pins
//     it).
//
// Every other message goes through the standard codec.
//
// A data-plane request comes to the codec as a dataRequest, which it checks
// against the data plane's limits before decoding any of it.
type batchCodec struct {
	encoding.CodecV2
	// maxMsgSize and maxBatch are the data plane's limits
	// (Config.MaxDataMsgSize and Config.MaxBatch).
	maxMsgSize, maxBatch int
}

// newBatchCodec returns the codec, with the data plane's limits.
func newBatchCodec(maxMsgSize, maxBatch int) encoding.CodecV2 {
	return batchCodec{CodecV2: encoding.GetCodecV2(protocodec.Name), maxMsgSize: maxMsgSize, maxBatch: maxBatch}
}

// dataRequest is a data-plane request (kms.v1.KMS's, and KMSAdmin.Probe's)
// to decode into msg: the gated handlers and Probe's (see kmsDesc and
// adminDesc) hand one to gRPC in place of the message. gRPC has one receive
// limit per server, the large one ApplyBundle needs, and decodes a request
// before any handler or interceptor runs; a decoded batch item costs up to
// three heap objects for two bytes on the wire, so a request of empty
// items would take dozens of times its size before anything refused it.
// The codec refuses a request over the data plane's limits before decoding
// any of it: it sets refused to the status the caller is to get, and kind
// to what the refusal is counted as, and decodes nothing; the handler then
// answers the refusal. (The codec reports it so, and not as its error,
// because gRPC answers a codec's error itself, with INTERNAL, before the
// handler returns.)
type dataRequest struct {
	method  string // the method's name, for the refusal's message
	msg     proto.Message
	refused error
	kind    shedKind
}

func (c batchCodec) Unmarshal(data mem.BufferSlice, v any) error {
	switch m := v.(type) {
	case *dataRequest:
		if c.check(data, m) != nil {
			return nil // refused, and nothing decoded: see dataRequest
		}
		return c.Unmarshal(data, m.msg)
	case *kmsv1.DecryptBatchRequest:
		b := data.Materialize()
		if decodeDecryptBatch(b, m) {
			return nil
		}
		proto.Reset(m)
		return proto.Unmarshal(b, m)
	case *kmsv1.EncryptBatchRequest:
		b := data.Materialize()
		if decodeEncryptBatch(b, m) {
			return nil
		}
		proto.Reset(m)
		return proto.Unmarshal(b, m)
	}
	return c.CodecV2.Unmarshal(data, v)
}

func (c batchCodec) Marshal(v any) (mem.BufferSlice, error) {
	switch m := v.(type) {
	case *kmsv1.DecryptBatchResponse:
		return decryptBatchResponse(m).marshal(), nil
	case *kmsv1.EncryptBatchResponse:
		return encryptBatchResponse(m).marshal(), nil
	}
	return c.CodecV2.Marshal(v)
}

// check refuses r, before any of it is decoded, if it is larger than the
// data plane's limit, or is a batch of more items (or probes) than its
// limit, counted on the wire. It sets r's refusal and returns it.
func (c batchCodec) check(data mem.BufferSlice, r *dataRequest) error {
	if n := data.Len(); n > c.maxMsgSize {
		r.refused, r.kind = messageTooLarge(r.method, n, c.maxMsgSize), shedSize
		return r.refused
	}
	switch r.msg.(type) {
	case *kmsv1.EncryptBatchRequest, *kmsv1.DecryptBatchRequest:
		if n := countField(data, fieldItems); n > c.maxBatch {
			r.refused, r.kind = batchTooLarge(n, c.maxBatch), shedItems
		}
	case *kmsv1.ProbeRequest:
		if n := countField(data, fieldProbes); n > c.maxBatch {
			r.refused, r.kind = tooManyProbes(n, c.maxBatch), shedItems
		}
	}
	return r.refused
}

// countField counts the top-level fields num of wire type bytes in the
// encoded message data: the elements proto.Unmarshal would make of a
// repeated message field num. It reads data where gRPC received it,
// without copying or allocating. It steps over every other field as
// protobuf does (groups included), and stops at the first malformed one,
// where proto.Unmarshal stops too (with an error): so it never counts fewer
// elements than protobuf (or the fast decoder, which takes less) would
// make.
func countField(data mem.BufferSlice, num protowire.Number) int {
	r := wireReader{rest: data}
	n, depth := 0, 0
	for {
		tag, ok := r.varint()
		if !ok {
			return n // the end, or a malformed tag
		}
		f, typ := protowire.DecodeTag(tag)
		switch typ {
		case protowire.VarintType:
			_, ok = r.varint()
		case protowire.Fixed32Type:
			ok = r.skip(4)
		case protowire.Fixed64Type:
			ok = r.skip(8)
		case protowire.BytesType:
			var l uint64
			if l, ok = r.varint(); ok {
				ok = r.skip(l)
			}
			if ok && depth == 0 && f == num {
				n++
			}
		case protowire.StartGroupType:
			depth++
		case protowire.EndGroupType:
			depth--
			ok = depth >= 0
		default:
			ok = false
		}
		if !ok {
			return n
		}
	}
}

// wireReader reads an encoded message from the buffers gRPC received it in.
type wireReader struct {
	cur  []byte          // the rest of the buffer being read
	rest mem.BufferSlice // the buffers after it
}

// next makes cur a buffer with bytes left, or reports false at the end.
func (r *wireReader) next() bool {
	for len(r.cur) == 0 {
		if len(r.rest) == 0 {
			return false
		}
		r.cur, r.rest = r.rest[0].ReadOnlyData(), r.rest[1:]
	}
	return true
}

// varint reads a varint (at most 10 bytes, as protobuf's).
func (r *wireReader) varint() (uint64, bool) {
	var v uint64
	for shift := 0; shift < 70; shift += 7 {
		if !r.next() {
			return 0, false
		}
		b := r.cur[0]
		r.cur = r.cur[1:]
		v |= uint64(b&0x7f) << shift
		if b < 0x80 {
			return v, true
		}
	}
	return 0, false
}

// skip steps over n bytes, or reports false if fewer are left.
func (r *wireReader) skip(n uint64) bool {
	for n > 0 {
		if !r.next() {
			return false
		}
		k := min(n, uint64(len(r.cur)))
		r.cur, n = r.cur[k:], n-k
	}
	return true
}

// Field numbers of the batch messages (kms.proto). A batch request is
// {keyset = 1; repeated item = 2}, each item two bytes fields, 1 and 2.
const (
	fieldKeyset   = 1
	fieldItems    = 2
	fieldProbes   = 1 // ProbeRequest's repeated probes (admin.proto)
	fieldItemData = 1 // EncryptItem.plaintext, DecryptItem.ciphertext
	fieldItemAD   = 2 // associated_data

	fieldResults  = 1 // repeated results
	fieldMaxItems = 2
	fieldOK       = 1 // oneof result: ok
	fieldError    = 2 // oneof result: error
	// EncryptResponse {ciphertext = 1; key_id = 2}, DecryptResponse
	// {plaintext = 1; key_id = 2}, ItemError {code = 1; message = 2}.
	fieldRespData  = 1
	fieldRespKeyID = 2
	fieldErrCode   = 1
	fieldErrMsg    = 2
)

// scanBatch walks a batch request in b: the keyset name, and each item's
// two byte fields, passed to item in order (data and ad alias b). It
// reports false for anything but the plain encoding of those fields (the
// caller then decodes with protobuf itself). With item nil it only counts.
func scanBatch(b []byte, keyset *string, item func(i int, data, ad []byte)) (int, bool) {
	n := 0
	for len(b) > 0 {
		num, typ, l := protowire.ConsumeTag(b)
		if l < 0 || typ != protowire.BytesType {
			return 0, false
		}
		b = b[l:]
		v, l := protowire.ConsumeBytes(b)
		if l < 0 {
			return 0, false
		}
		b = b[l:]
		switch num {
		case fieldKeyset:
			if !utf8.Valid(v) {
				return 0, false // protobuf's error, not ours
			}
			if item != nil {
				*keyset = string(v)
			}
		case fieldItems:
			data, ad, ok := scanItem(v)
			if !ok {
				return 0, false
			}
			if item != nil {
				item(n, data, ad)
			}
			n++
		default:
			return 0, false
		}
	}
	return n, true
}

// scanItem reads an item's two byte fields (the last of each wins, as in
// protobuf).
func scanItem(b []byte) (data, ad []byte, ok bool) {
	for len(b) > 0 {
		num, typ, l := protowire.ConsumeTag(b)
		if l < 0 || typ != protowire.BytesType {
			return nil, nil, false
		}
		b = b[l:]
		v, l := protowire.ConsumeBytes(b)
		if l < 0 {
			return nil, nil, false
		}
		b = b[l:]
		switch num {
		case fieldItemData:
			data = v
		case fieldItemAD:
			ad = v
		default:
			return nil, nil, false
		}
	}
	return data, ad, true
}

// decodeDecryptBatch decodes b into m (one slice for every item), or
// reports false, leaving m for protobuf to decode.
func decodeDecryptBatch(b []byte, m *kmsv1.DecryptBatchRequest) bool {
	n, ok := scanBatch(b, nil, nil)
	if !ok {
		return false
	}
	items := make([]kmsv1.DecryptItem, n)
	m.Items = make([]*kmsv1.DecryptItem, n)
	scanBatch(b, &m.Keyset, func(i int, data, ad []byte) {
		it := &items[i]
		it.Ciphertext, it.AssociatedData = data, ad
		m.Items[i] = it
	})
	return true
}

// decodeEncryptBatch is decodeDecryptBatch for EncryptBatchRequest.
func decodeEncryptBatch(b []byte, m *kmsv1.EncryptBatchRequest) bool {
	n, ok := scanBatch(b, nil, nil)
	if !ok {
		return false
	}
	items := make([]kmsv1.EncryptItem, n)
	m.Items = make([]*kmsv1.EncryptItem, n)
	scanBatch(b, &m.Keyset, func(i int, data, ad []byte) {
		it := &items[i]
		it.Plaintext, it.AssociatedData = data, ad
		m.Items[i] = it
	})
	return true
}

// The encoders below write proto3's encoding as proto.Marshal does: fields
// in number order, zero scalars and empty bytes left out, a oneof's set
// member (even an empty message) written.

// sizeResponse is the encoded size of an EncryptResponse or DecryptResponse.
func sizeResponse(data []byte, keyID uint32) int {
	n := 0
	if len(data) > 0 {
		n += protowire.SizeTag(fieldRespData) + protowire.SizeBytes(len(data))
	}
	if keyID != 0 {
		n += protowire.SizeTag(fieldRespKeyID) + protowire.SizeVarint(uint64(keyID))
	}
	return n
}

func appendResponse(b, data []byte, keyID uint32) []byte {
	if len(data) > 0 {
		b = protowire.AppendTag(b, fieldRespData, protowire.BytesType)
		b = protowire.AppendBytes(b, data)
	}
	if keyID != 0 {
		b = protowire.AppendTag(b, fieldRespKeyID, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(keyID))
	}
	return b
}

func sizeItemError(e *kmsv1.ItemError) int {
	n := 0
	if c := e.GetCode(); c != 0 {
		n += protowire.SizeTag(fieldErrCode) + protowire.SizeVarint(uint64(c))
	}
	if msg := e.GetMessage(); msg != "" {
		n += protowire.SizeTag(fieldErrMsg) + protowire.SizeBytes(len(msg))
	}
	return n
}

func appendItemError(b []byte, e *kmsv1.ItemError) []byte {
	if c := e.GetCode(); c != 0 {
		b = protowire.AppendTag(b, fieldErrCode, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(c))
	}
	if msg := e.GetMessage(); msg != "" {
		b = protowire.AppendTag(b, fieldErrMsg, protowire.BytesType)
		b = protowire.AppendString(b, msg)
	}
	return b
}

// result is one batch result's oneof: an ok response (data, keyID), an
// error, or neither.
type result struct {
	kind  resultKind
	data  []byte
	keyID uint32
	err   *kmsv1.ItemError // nil-safe getters: a nil one encodes empty
}

type resultKind uint8

const (
	resultUnset resultKind = iota
	resultOK
	resultError
)

// size is the result message's encoded size.
func (r result) size() int {
	switch r.kind {
	case resultOK:
		return protowire.SizeTag(fieldOK) + protowire.SizeBytes(sizeResponse(r.data, r.keyID))
	case resultError:
		return protowire.SizeTag(fieldError) + protowire.SizeBytes(sizeItemError(r.err))
	}
	return 0
}

func (r result) append(b []byte) []byte {
	switch r.kind {
	case resultOK:
		b = protowire.AppendTag(b, fieldOK, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(sizeResponse(r.data, r.keyID)))
		return appendResponse(b, r.data, r.keyID)
	case resultError:
		b = protowire.AppendTag(b, fieldError, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(sizeItemError(r.err)))
		return appendItemError(b, r.err)
	}
	return b
}

// batchResponse is a batch response to encode: n results (res(i) gives
// each) and the batch limit.
type batchResponse struct {
	n        int
	res      func(i int) result
	maxItems uint32
}

func (m batchResponse) size() int {
	size := 0
	for i := range m.n {
		size += protowire.SizeTag(fieldResults) + protowire.SizeBytes(m.res(i).size())
	}
	if m.maxItems != 0 {
		size += protowire.SizeTag(fieldMaxItems) + protowire.SizeVarint(uint64(m.maxItems))
	}
	return size
}

func (m batchResponse) append(b []byte) []byte {
	for i := range m.n {
		r := m.res(i)
		b = protowire.AppendTag(b, fieldResults, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(r.size()))
		b = r.append(b)
	}
	if m.maxItems != 0 {
		b = protowire.AppendTag(b, fieldMaxItems, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(m.maxItems))
	}
	return b
}

// marshal encodes m into a buffer of gRPC's pool (as the standard codec
// does for all but small messages).
func (m batchResponse) marshal() mem.BufferSlice {
	size := m.size()
	if mem.IsBelowBufferPoolingThreshold(size) {
		return mem.BufferSlice{mem.SliceBuffer(m.append(make([]byte, 0, size)))}
	}
	pool := mem.DefaultBufferPool()
	buf := pool.Get(size)
	*buf = m.append((*buf)[:0])
	return mem.BufferSlice{mem.NewBuffer(buf, pool)}
}

func decryptBatchResponse(m *kmsv1.DecryptBatchResponse) batchResponse {
	rs := m.GetResults()
	return batchResponse{n: len(rs), maxItems: m.GetMaxItems(), res: func(i int) result {
		switch r := rs[i].GetResult().(type) {
		case *kmsv1.DecryptResult_Ok:
			return result{kind: resultOK, data: r.Ok.GetPlaintext(), keyID: r.Ok.GetKeyId()}
		case *kmsv1.DecryptResult_Error:
			return result{kind: resultError, err: r.Error}
		}
		return result{}
	}}
}

func encryptBatchResponse(m *kmsv1.EncryptBatchResponse) batchResponse {
	rs := m.GetResults()
	return batchResponse{n: len(rs), maxItems: m.GetMaxItems(), res: func(i int) result {
		switch r := rs[i].GetResult().(type) {
		case *kmsv1.EncryptResult_Ok:
			return result{kind: resultOK, data: r.Ok.GetCiphertext(), keyID: r.Ok.GetKeyId()}
		case *kmsv1.EncryptResult_Error:
			return result{kind: resultError, err: r.Error}
		}
		return result{}
	}}
}
