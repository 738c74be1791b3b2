package audit

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"strconv"
	"strings"
	"sync/atomic"
	"unicode"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/identity"
)

// RequestIDHeader is the gRPC metadata key of a request's ID. A client may
// send one (it is kept if well-formed, so the client can correlate any call
// with its audit records); when a call fails, the server returns the ID it
// used in the response header, so a caller can quote it to an operator. A
// successful call does not echo it: a per-call header costs the data path
// about ten allocations and a header block, for an ID nobody asked for.
const RequestIDHeader = "x-request-id"

// refusedMessage is the message of the Unavailable error a call gets when its
// audit record cannot be written: the operation is refused (fail closed).
const refusedMessage = "audit log unavailable: operation refused"

// InterceptorOptions configures UnaryServerInterceptor.
type InterceptorOptions struct {
	// Mutating names full gRPC methods ("/cairn.rootkms.v1.RootKMS/CreateRegion")
	// that change state. For those an OutcomeAttempt record is written
	// before the handler runs, and if it cannot be written the handler does
	// not run at all: an unaudited change never happens. Nor does it run if
	// the caller's context ended while the record was being written (a sink
	// that hung): the caller has been refused, and its change must not
	// happen once the sink comes back. For every method, an
	// outcome record is written after the handler; if that fails, the result
	// is withheld and the caller gets Unavailable. (A mutating call whose
	// outcome record fails has still been applied; its attempt record says
	// so.)
	Mutating []string
	// Unaudited names methods that neither change state nor return key
	// material (status polls), which would otherwise fill the log with
	// monitoring noise. Keep it short: everything else is audited. A
	// refused call (PermissionDenied, Unauthenticated) of such a method is
	// audited all the same.
	Unaudited []string
}

// UnaryServerInterceptor audits every call: who (the identity in the context,
// put there by identity.UnaryServerInterceptor or identity.NewContext, or
// else the verified peer of the connection, identity.FromPeer), what (method
// and target), and the outcome. Chain it first, before
// identity.UnaryServerInterceptor and identity.UnaryAuthorizeInterceptor, so
// that their refusals (Unauthenticated, PermissionDenied) are audited too.
//
// A method in opts.Unaudited leaves no record when it succeeds or fails
// otherwise, but a refusal (PermissionDenied or Unauthenticated, from an
// interceptor or the handler) is always recorded, and if that record cannot
// be written the caller gets Unavailable.
//
// The target is taken from the request's GetRegion, GetKeyset and GetName
// methods where it has them, and handlers add what only they know (a key
// version) with AddTarget.
func UnaryServerInterceptor(l *Log, opts InterceptorOptions) grpc.UnaryServerInterceptor {
	mutating := make(map[string]bool, len(opts.Mutating))
	for _, m := range opts.Mutating {
		mutating[m] = true
	}
	unaudited := make(map[string]bool, len(opts.Unaudited))
	for _, m := range opts.Unaudited {
		unaudited[m] = true
	}
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		rid := requestID(ctx)
		if unaudited[info.FullMethod] {
			resp, err := handler(context.WithValue(ctx, annotationKey{}, &annotation{rid: rid}), req)
			if err != nil {
				echoRequestID(ctx, rid)
				if isRefusal(err) {
					rec := Record{RequestID: rid, Identity: callerOf(ctx), Operation: info.FullMethod, Target: targetOf(req)}
					rec.setOutcome(err)
					if werr := l.Append(ctx, rec); werr != nil {
						return nil, refused(werr)
					}
				}
			}
			return resp, err
		}
		ann := &annotation{target: targetOf(req), rid: rid}
		rec := Record{RequestID: rid, Identity: callerOf(ctx), Operation: info.FullMethod}

		if mutating[info.FullMethod] {
			rec.Target, rec.Outcome = ann.target, OutcomeAttempt
			if err := l.Write(ctx, rec); err != nil {
				echoRequestID(ctx, rid)
				return nil, refused(err)
			}
		}
		var (
			resp any
			herr error
		)
		if err := ctx.Err(); mutating[info.FullMethod] && err != nil {
			// The attempt record's writer may have waited for a hung sink
			// past the caller's deadline (the one writer inside write(2)
			// waits whatever ctx says). The caller has been told its call
			// failed, so the change must not happen behind its back when
			// the sink comes back: the handler does not run, and the
			// outcome record says so.
			herr = status.FromContextError(err).Err()
		} else {
			resp, herr = handler(context.WithValue(ctx, annotationKey{}, ann), req)
		}

		rec.Target = ann.target
		rec.setOutcome(herr)
		// The outcome record is queued even if the caller has gone away
		// (what happened must be on record); the caller's context bounds
		// only the wait for the write, so a sink that hangs refuses calls
		// at their deadlines instead of holding them forever.
		if err := l.Append(ctx, rec); err != nil {
			echoRequestID(ctx, rid)
			return nil, refused(err)
		}
		if herr != nil {
			echoRequestID(ctx, rid)
		}
		return resp, herr
	}
}

// callerOf is the caller's identity for a record: the one in ctx, else the
// verified peer of the connection, else "" (not authenticated).
func callerOf(ctx context.Context) string {
	if id, ok := identity.FromContext(ctx); ok {
		return id.String()
	}
	if id, err := identity.FromPeer(ctx); err == nil {
		return id.String()
	}
	return ""
}

// isRefusal reports whether err refuses the caller: PermissionDenied or
// Unauthenticated. A refusal is audited even for an Unaudited method.
func isRefusal(err error) bool {
	switch status.Code(err) {
	case codes.PermissionDenied, codes.Unauthenticated:
		return true
	}
	return false
}

// echoRequestID puts the call's request ID in its response header. A unary
// handler has not sent the header yet, so this works after it returned.
func echoRequestID(ctx context.Context, rid string) {
	_ = grpc.SetHeader(ctx, metadata.MD{RequestIDHeader: []string{rid}}) // the key is lowercase already
}

func refused(err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return status.FromContextError(err).Err()
	}
	return status.Error(codes.Unavailable, refusedMessage)
}

// AddTarget adds to the target of the call's outcome record the non-zero
// fields of t (for example the key version a decryption used). It does
// nothing outside an audited call.
func AddTarget(ctx context.Context, t Target) {
	ann, ok := ctx.Value(annotationKey{}).(*annotation)
	if !ok {
		return
	}
	if t.Region != "" {
		ann.target.Region = t.Region
	}
	if t.Keyset != "" {
		ann.target.Keyset = t.Keyset
	}
	if t.KeyVersion != 0 {
		ann.target.KeyVersion = t.KeyVersion
	}
	if t.Resource != "" {
		ann.target.Resource = t.Resource
	}
}

// RequestID returns the ID of the audited call in ctx, or "".
func RequestID(ctx context.Context) string {
	if ann, ok := ctx.Value(annotationKey{}).(*annotation); ok {
		return ann.rid
	}
	return ""
}

type annotationKey struct{}

// annotation is the per-call state: the request ID, and the target handlers
// add to. A unary handler runs on one goroutine, so it needs no lock.
type annotation struct {
	target Target
	rid    string
}

// requestID keeps a well-formed client-supplied ID, or makes one: a random
// per-process prefix and a counter (unique, unguessable across processes,
// and cheap on the data path: no copy of the metadata, no entropy per call).
func requestID(ctx context.Context) string {
	if v := metadata.ValueFromIncomingContext(ctx, RequestIDHeader); len(v) == 1 && validRequestID(v[0]) {
		return v[0]
	}
	n := requestCounter.Add(1)
	b := make([]byte, 0, 32)
	b = append(b, requestPrefix...)
	return string(strconv.AppendUint(b, n, 16))
}

var (
	requestPrefix  = newRequestPrefix()
	requestCounter atomic.Uint64
)

func newRequestPrefix() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b[:]) + "-"
}

func validRequestID(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.' || c == ':') {
			return false
		}
	}
	return true
}

// targetOf reads the target fields a request message has. They are what the
// client sent, so they are made safe to record (a hostile keyset name must
// be audited, not make the audit write fail).
func targetOf(req any) Target {
	var t Target
	if r, ok := req.(interface{ GetRegion() string }); ok {
		t.Region = cleanField(r.GetRegion())
	}
	if r, ok := req.(interface{ GetKeyset() string }); ok {
		t.Keyset = cleanField(r.GetKeyset())
	}
	if r, ok := req.(interface{ GetName() string }); ok {
		t.Resource = cleanField(r.GetName())
	}
	return t
}

// maxClientField bounds how much of a client-supplied string is recorded.
const maxClientField = 256

// cleanField returns s if it is short, valid UTF-8 without control
// characters, and otherwise an ASCII-quoted, truncated rendering of it.
func cleanField(s string) string {
	if len(s) <= maxClientField && utf8.ValidString(s) && !strings.ContainsFunc(s, unicode.IsControl) {
		return s
	}
	if len(s) > maxClientField {
		s = s[:maxClientField]
	}
	return strconv.QuoteToASCII(s)
}

// StreamServerInterceptor audits a streaming call like UnaryServerInterceptor
// audits a unary one: one outcome record when the stream ends (Cairn serves
// only read-only streams: reflection and health watches, so there is no
// attempt record). Chain it first, like the unary one. A method in
// opts.Unaudited is recorded only when it is refused. If the record cannot
// be written the caller gets Unavailable.
func StreamServerInterceptor(l *Log, opts InterceptorOptions) grpc.StreamServerInterceptor {
	unaudited := make(map[string]bool, len(opts.Unaudited))
	for _, m := range opts.Unaudited {
		unaudited[m] = true
	}
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		ctx := ss.Context()
		rec := Record{RequestID: requestID(ctx), Identity: callerOf(ctx), Operation: info.FullMethod}
		herr := handler(srv, ss)
		if unaudited[info.FullMethod] && !isRefusal(herr) {
			return herr
		}
		rec.setOutcome(herr)
		if err := l.Append(ctx, rec); err != nil {
			return refused(err)
		}
		return herr
	}
}

// setOutcome records what came of a call that returned herr: ok, denied
// (PermissionDenied, Unauthenticated) or error, with the code and message.
func (r *Record) setOutcome(herr error) {
	r.Outcome = OutcomeOK
	if herr == nil {
		return
	}
	st := status.Convert(herr)
	switch st.Code() {
	case codes.OK:
	case codes.PermissionDenied, codes.Unauthenticated:
		r.Outcome, r.Code, r.Reason = OutcomeDenied, st.Code().String(), st.Message()
	default:
		r.Outcome, r.Code, r.Reason = OutcomeError, st.Code().String(), st.Message()
	}
}
