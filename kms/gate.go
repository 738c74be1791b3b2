package kms

import (
	"context"
	"fmt"
	"slices"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cairnkms/cairn/internal/identity"
	kmsv1 "github.com/cairnkms/cairn/proto/cairn/kms/v1"
)

// kmsDesc returns kms.v1.KMS's service description with every method
// behind the gate: the generated one, but each handler first reads its
// request, then admits the call (the caller's quota and the server's cap on
// calls in progress, see admission), and only then runs the interceptors
// (identity, audit, access policy) and the handler. The request is read
// through the codec's data-plane limits (see dataRequest): one over
// MaxDataMsgSize, or a batch of more than MaxBatch items, is refused before
// any of it is decoded. A refusal there runs no handler and writes no audit
// record of its own: the caller's refusals are counted and audited once
// per QuotaAuditWindow (auditRefusals), so a flood cannot flood the audit
// log.
//
// The request is read before admission because gRPC reads a unary request
// only when the handler asks for it: a call admitted first would hold its
// slot for as long as its client withheld the request, and a few clients
// opening calls and never sending them would take every slot of the server
// (each body-less call then holds only its stream, which
// grpcserver.Options.MaxConcurrentStreams bounds per connection).
//
// The server's MaxRecvMsgSize stays the large one ApplyBundle needs: gRPC
// has one receive limit per server, so a data-plane request up to it is
// read, and refused by its size before it is decoded.
func (s *Server) kmsDesc(api *kmsAPI) (*grpc.ServiceDesc, error) {
	gates := map[string]grpc.MethodDesc{
		"Encrypt":         gated(s, api, "Encrypt", (*kmsAPI).Encrypt),
		"Decrypt":         gated(s, api, "Decrypt", (*kmsAPI).Decrypt),
		"EncryptBatch":    gated(s, api, "EncryptBatch", (*kmsAPI).EncryptBatch),
		"DecryptBatch":    gated(s, api, "DecryptBatch", (*kmsAPI).DecryptBatch),
		"GenerateDataKey": gated(s, api, "GenerateDataKey", (*kmsAPI).GenerateDataKey),
		"Rewrap":          gated(s, api, "Rewrap", (*kmsAPI).Rewrap),
	}
	d := kmsv1.KMS_ServiceDesc
	if len(d.Streams) > 0 {
		return nil, fmt.Errorf("kms: kms.v1.KMS has streams, which the gate does not cover")
	}
	d.Methods = nil
	for _, m := range kmsv1.KMS_ServiceDesc.Methods {
		g, ok := gates[m.MethodName]
		if !ok {
			return nil, fmt.Errorf("kms: kms.v1.KMS method %s has no gate", m.MethodName)
		}
		d.Methods = append(d.Methods, g)
	}
	return &d, nil
}

// gated is the gated gRPC handler of one data-plane method, h.
func gated[Req any, PReq interface {
	*Req
	proto.Message
}, Resp any](s *Server, api *kmsAPI, name string, h func(*kmsAPI, context.Context, PReq) (Resp, error)) grpc.MethodDesc {
	info := &grpc.UnaryServerInfo{Server: api, FullMethod: kmsService + name}
	handler := func(ctx context.Context, req any) (any, error) {
		resp, err := h(api, ctx, req.(PReq))
		return resp, err
	}
	return grpc.MethodDesc{MethodName: name, Handler: func(_ any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
		id, err := identity.FromPeer(ctx)
		if err != nil {
			return nil, status.Error(codes.Unauthenticated, err.Error())
		}
		in := PReq(new(Req))
		r := dataRequest{method: name, msg: in}
		if err := dec(&r); err != nil {
			return nil, err
		}
		if r.refused != nil {
			// Over a data-plane limit: not admitted (nothing of it was
			// decoded to take a slot for), but counted against its caller,
			// who is known, as the admission's refusals are.
			s.adm.refuseUnadmitted(id, r.kind)
			return nil, r.refused
		}
		c, err := s.adm.admit(id)
		if err != nil {
			return nil, err
		}
		defer s.adm.release(c)
		if interceptor == nil {
			return handler(ctx, in)
		}
		return interceptor(ctx, in, info, handler)
	}}
}

// adminDesc returns kms.v1.KMSAdmin's service description, the generated
// one but for Probe, whose request is read through the codec's data-plane
// limits (see dataRequest) as a data-plane batch is: gRPC decodes a request
// before the access policy is asked, so without them anyone could have a
// request of MaxRecvMsgSize bytes decoded into as many probes. A refusal
// is the handler's error, behind the interceptors, so that a caller who is
// no admin is refused as such and the call is audited, as every Probe is.
func adminDesc(api *adminAPI) (*grpc.ServiceDesc, error) {
	d := kmsv1.KMSAdmin_ServiceDesc
	d.Methods = slices.Clone(d.Methods)
	i := slices.IndexFunc(d.Methods, func(m grpc.MethodDesc) bool { return m.MethodName == "Probe" })
	if i < 0 {
		return nil, fmt.Errorf("kms: kms.v1.KMSAdmin has no method Probe to bound")
	}
	info := &grpc.UnaryServerInfo{Server: api, FullMethod: adminService + "Probe"}
	d.Methods[i].Handler = func(_ any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
		in := new(kmsv1.ProbeRequest)
		handler := func(ctx context.Context, req any) (any, error) {
			return api.Probe(ctx, req.(*kmsv1.ProbeRequest))
		}
		r := dataRequest{method: "Probe", msg: in}
		if err := dec(&r); err != nil {
			return nil, err
		}
		if r.refused != nil {
			handler = func(context.Context, any) (any, error) { return nil, r.refused }
		}
		if interceptor == nil {
			return handler(ctx, in)
		}
		return interceptor(ctx, in, info, handler)
	}
	return &d, nil
}

// messageTooLarge is the refusal of a data-plane request of size bytes,
// more than MaxDataMsgSize (limit), by the codec (see dataRequest):
// RESOURCE_EXHAUSTED, the code gRPC gives a request over its own receive
// limit: to the caller the data plane's limit is that limit (it is below
// the server's only because ApplyBundle shares it). Unlike an admission
// refusal it carries no retry hint, so kmsclient does not retry a batch it
// refuses (the same batch would be refused again).
func messageTooLarge(method string, size, limit int) error {
	return status.Errorf(codes.ResourceExhausted, "kms: the %s request is %d bytes, more than the data plane's limit of %d bytes: split it into smaller calls (only ApplyBundle takes larger requests)",
		method, size, limit)
}
