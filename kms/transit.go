package kms

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"strconv"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/kms/keystore"
	"github.com/cairnkms/cairn/kms/transit"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// transitReadKey is the operation the transit key read is authorized and
// audited as: no gRPC method reads a key's metadata.
const transitReadKey = "/cairn.kms.v1.Transit/ReadKey"

// transitResource marks the audit records of calls that came over the
// transit API: their target's resource is "via=transit" (a Rewrap's is
// "source_key_id=<N> via=transit"). Everything else in the record is what
// the gRPC call would have written.
const transitResource = "via=transit"

// Transit returns the handler of the Vault transit API (package
// kms/transit) over this server's data plane. Each HTTP call runs the
// kms.v1.KMS handler it maps to, behind the interceptors of the gRPC API:
// the caller's identity (from the request's TLS peer certificate), the
// audit record (fail closed; its operation is the gRPC method, e.g.
// "/cairn.kms.v1.KMS/Decrypt", and the key read's "/cairn.kms.v1.Transit/ReadKey")
// and the access policy; the handlers enforce the keysets' ACLs. opts.Limits
// is set from the server's configuration; opts.Logger defaults to the
// server's.
//
// Serve the handler over TLS configured by identity.ServerTLSConfig with
// this server's Source (TLS 1.3, a client certificate verified as an
// X.509-SVID of the trust domain): the handler trusts the peer certificate
// the connection presents. Shut the HTTP server down before Close, so that
// the usage history Close writes is complete.
func (s *Server) Transit(opts transit.Options) (http.Handler, error) {
	opts.Limits = transit.Limits{
		MaxBatch: s.cfg.MaxBatch, MaxPayload: s.cfg.MaxPayload,
		MaxCiphertext: s.cfg.MaxPayload + maxCiphertextOverhead, MaxMessage: s.cfg.MaxDataMsgSize,
	}
	if opts.Logger == nil {
		opts.Logger = s.log
	}
	policy := maps.Clone(s.policy)
	policy[transitReadKey] = identity.AllowAny() // the handler checks the keyset's ACLs
	b := &transitBackend{
		s:   s,
		api: &kmsAPI{s: s},
		// The data plane's methods are neither mutating nor unaudited.
		audit:     audit.UnaryServerInterceptor(s.cfg.Audit, audit.InterceptorOptions{}),
		authorize: identity.UnaryAuthorizeInterceptor(policy),
	}
	return transit.NewHandler(b, opts)
}

// transitBackend implements transit.Backend with the data plane.
type transitBackend struct {
	s         *Server
	api       *kmsAPI
	audit     grpc.UnaryServerInterceptor
	authorize grpc.UnaryServerInterceptor
}

// invoke runs h for method as the gRPC server runs a call: identity (from
// the Call's TLS state), admission (the caller's quota and the server's cap
// on calls in progress, shared with the gRPC API; a refusal is audited once
// per window, not per call), audit, authorization, then the handler.
func (b *transitBackend) invoke(ctx context.Context, method string, req any, h grpc.UnaryHandler) (any, error) {
	call := transit.CallFrom(ctx)
	if call == nil {
		return nil, status.Error(codes.Internal, "kms: transit call without its request")
	}
	id, err := tlsPeerID(call.TLS)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	c, err := b.s.adm.admit(id)
	if err != nil {
		return nil, err
	}
	defer b.s.adm.release(c)
	ctx = identity.NewContext(ctx, id)
	if rid := call.RequestID(); rid != "" {
		// The audit interceptor keeps it if it is well-formed, as it keeps
		// a gRPC client's.
		ctx = metadata.NewIncomingContext(ctx, metadata.MD{audit.RequestIDHeader: []string{rid}})
	}
	info := &grpc.UnaryServerInfo{Server: b.api, FullMethod: method}
	return b.audit(ctx, req, info, func(ctx context.Context, req any) (any, error) {
		call.SetRequestID(audit.RequestID(ctx))
		audit.AddTarget(ctx, audit.Target{Resource: transitResource})
		return b.authorize(ctx, req, info, h)
	})
}

// tlsPeerID is the verified SPIFFE ID of a TLS 1.3 connection's client.
func tlsPeerID(st *tls.ConnectionState) (identity.ID, error) {
	switch {
	case st == nil:
		return identity.ID{}, errors.New("kms: transit: the request did not come over TLS")
	case !st.HandshakeComplete || st.Version != tls.VersionTLS13:
		return identity.ID{}, fmt.Errorf("kms: transit: negotiated %s; TLS 1.3 is required", tls.VersionName(st.Version))
	case len(st.PeerCertificates) == 0:
		return identity.ID{}, errors.New("kms: transit: the client presented no certificate")
	}
	sid, err := x509svid.IDFromCert(st.PeerCertificates[0])
	if err != nil {
		return identity.ID{}, fmt.Errorf("kms: transit: client certificate: %v", err)
	}
	return identity.FromSPIFFEID(sid)
}

// call is invoke for a typed handler.
func call[Req, Resp any](ctx context.Context, b *transitBackend, method string, req Req, h func(context.Context, Req) (Resp, error)) (Resp, error) {
	resp, err := b.invoke(ctx, method, req, func(ctx context.Context, req any) (any, error) { return h(ctx, req.(Req)) })
	if err != nil {
		var zero Resp
		return zero, err
	}
	return resp.(Resp), nil
}

// primaryOnly wraps an encrypting handler: a nonzero version must be the
// keyset's primary. It is checked inside the call (audited, authorized,
// against the keyset's ACL for op) before the handler encrypts anything,
// and again on its answer (under reports whether all of it was made under
// the version), in case a bundle swap changed the primary in between: that
// answer is dropped, and the call fails.
func primaryOnly[Req interface{ GetKeyset() string }, Resp any](
	s *Server, op keystore.Op, version uint32, under func(Resp, uint32) bool, h func(context.Context, Req) (Resp, error),
) func(context.Context, Req) (Resp, error) {
	if version == 0 {
		return h
	}
	return func(ctx context.Context, req Req) (Resp, error) {
		var zero Resp
		k, err := s.keyset(ctx, req.GetKeyset(), op)
		if err != nil {
			return zero, toStatus(err)
		}
		if p := k.Primary().KeyID(); p != version {
			return zero, toStatus(fmt.Errorf("%w: key_version %d: keyset %q encrypts only with its primary version, %d (Cairn has no other encryption version); omit key_version or send 0",
				errInvalid, version, k.Name(), p))
		}
		resp, err := h(ctx, req)
		if err == nil && !under(resp, version) {
			if dk, ok := any(resp).(interface{ GetPlaintextKey() []byte }); ok {
				clear(dk.GetPlaintextKey())
			}
			return zero, toStatus(fmt.Errorf("%w: key_version %d: the keyset's primary changed during the call; retry", errInvalid, version))
		}
		return resp, err
	}
}

// keyIDIs reports whether a single answer was made under version.
func keyIDIs[R interface{ GetKeyId() uint32 }](r R, version uint32) bool {
	return r.GetKeyId() == version
}

// batchUnder reports whether every item an EncryptBatch encrypted was made
// under version.
func batchUnder(r *kmsv1.EncryptBatchResponse, version uint32) bool {
	for _, res := range r.GetResults() {
		if ok := res.GetOk(); ok != nil && ok.GetKeyId() != version {
			return false
		}
	}
	return true
}

// Encrypt implements transit.Backend.
func (b *transitBackend) Encrypt(ctx context.Context, version uint32, req *kmsv1.EncryptRequest) (*kmsv1.EncryptResponse, error) {
	return call(ctx, b, kmsService+"Encrypt", req, primaryOnly(b.s, keystore.OpEncrypt, version, keyIDIs[*kmsv1.EncryptResponse], b.api.Encrypt))
}

// EncryptBatch implements transit.Backend.
func (b *transitBackend) EncryptBatch(ctx context.Context, version uint32, req *kmsv1.EncryptBatchRequest) (*kmsv1.EncryptBatchResponse, error) {
	return call(ctx, b, kmsService+"EncryptBatch", req, primaryOnly(b.s, keystore.OpEncrypt, version, batchUnder, b.api.EncryptBatch))
}

// Decrypt implements transit.Backend.
func (b *transitBackend) Decrypt(ctx context.Context, req *kmsv1.DecryptRequest) (*kmsv1.DecryptResponse, error) {
	return call(ctx, b, kmsService+"Decrypt", req, b.api.Decrypt)
}

// DecryptBatch implements transit.Backend.
func (b *transitBackend) DecryptBatch(ctx context.Context, req *kmsv1.DecryptBatchRequest) (*kmsv1.DecryptBatchResponse, error) {
	return call(ctx, b, kmsService+"DecryptBatch", req, b.api.DecryptBatch)
}

// GenerateDataKey implements transit.Backend.
func (b *transitBackend) GenerateDataKey(ctx context.Context, version uint32, req *kmsv1.GenerateDataKeyRequest) (*kmsv1.GenerateDataKeyResponse, error) {
	return call(ctx, b, kmsService+"GenerateDataKey", req, primaryOnly(b.s, keystore.OpGenerateDataKey, version, keyIDIs[*kmsv1.GenerateDataKeyResponse], b.api.GenerateDataKey))
}

// Rewrap implements transit.Backend. The audit record's resource is
// "source_key_id=<N> via=transit".
func (b *transitBackend) Rewrap(ctx context.Context, version uint32, req *kmsv1.RewrapRequest) (*kmsv1.RewrapResponse, error) {
	h := primaryOnly(b.s, keystore.OpRewrap, version, keyIDIs[*kmsv1.RewrapResponse], b.api.Rewrap)
	return call(ctx, b, kmsService+"Rewrap", req, func(ctx context.Context, req *kmsv1.RewrapRequest) (*kmsv1.RewrapResponse, error) {
		resp, err := h(ctx, req)
		if err == nil {
			audit.AddTarget(ctx, audit.Target{Resource: "source_key_id=" + strconv.FormatUint(uint64(resp.GetSourceKeyId()), 10) + " " + transitResource})
		}
		return resp, err
	})
}

// keyRead is the key read's request, for the audit record's target.
type keyRead struct{ keyset string }

func (r keyRead) GetKeyset() string { return r.keyset }

// ReadKey implements transit.Backend.
func (b *transitBackend) ReadKey(ctx context.Context, name string) (*transit.Key, error) {
	return call(ctx, b, transitReadKey, keyRead{name}, func(ctx context.Context, r keyRead) (*transit.Key, error) {
		return b.s.readKey(ctx, r.keyset)
	})
}

// Ready implements transit.Backend with the server's readiness (as gRPC
// health reports it): not only a bundle served, but an audit log that
// works, without which every call is refused.
func (b *transitBackend) Ready() bool {
	ready, _ := b.s.Readiness()
	return ready
}

// aclOps are the operations a keyset's ACL grants.
var aclOps = []keystore.Op{keystore.OpEncrypt, keystore.OpDecrypt, keystore.OpGenerateDataKey, keystore.OpRewrap}

// readKey describes keyset name to a caller on one of its ACLs; to anyone
// else it answers exactly what it answers for an unknown keyset.
func (s *Server) readKey(ctx context.Context, name string) (*transit.Key, error) {
	cur := s.cur.Load()
	if cur == nil {
		_, reason := s.State()
		return nil, toStatus(fmt.Errorf("%w: %s", errNotReady, reason))
	}
	audit.AddTarget(ctx, audit.Target{Region: s.cfg.Region})
	k, ok := cur.store.Keyset(name)
	id, _ := identity.FromContext(ctx)
	if !ok || !onSomeACL(k, id) {
		// One answer for an unknown keyset and one the caller is on no ACL
		// of: NOT_FOUND, the 404 Vault gives for a missing key (the data
		// plane's methods give PERMISSION_DENIED for both instead).
		return nil, toStatus(fmt.Errorf("%w: %q in region %s", errUnknownKeyset, truncate(name), s.cfg.Region))
	}
	out := &transit.Key{Name: k.Name(), Primary: k.Primary().KeyID()}
	for _, v := range k.Versions() {
		if !v.Decrypts() {
			continue
		}
		kv := transit.KeyVersion{ID: v.KeyID(), Parameters: v.Parameters()}
		if l, ok := k.Lifecycle(v.KeyID()); ok {
			kv.Since = l.PropagatedEverywhere
			if kv.Since.IsZero() || (!l.PrimarySince.IsZero() && l.PrimarySince.Before(kv.Since)) {
				kv.Since = l.PrimarySince
			}
		}
		out.Versions = append(out.Versions, kv)
	}
	audit.AddTarget(ctx, audit.Target{KeyVersion: out.Primary})
	return out, nil
}

func onSomeACL(k *keystore.Keyset, id identity.ID) bool {
	for _, op := range aclOps {
		if k.Allows(op, id) {
			return true
		}
	}
	return false
}
