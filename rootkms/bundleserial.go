package rootkms

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairnkms/cairn/internal/audit"
	statev1 "github.com/cairnkms/cairn/proto/cairn/rootkms/state/v1"
	rootkmsv1 "github.com/cairnkms/cairn/proto/cairn/rootkms/v1"
)

// RecordBundleSerial implements RootKMS: it raises the region's bundle
// serial floor (never lowers it), which a KMS server with a fresh state
// directory reads (GetRegion) before it applies a bundle. regionctl calls it
// after it applied a bundle; the answer is the region with the floor in
// force.
func (s *Server) RecordBundleSerial(ctx context.Context, req *rootkmsv1.RecordBundleSerialRequest) (*rootkmsv1.Region, error) {
	audit.AddTarget(ctx, audit.Target{Region: req.GetRegion()})
	if req.GetSerial() == 0 {
		return nil, status.Error(codes.InvalidArgument, "rootkms: record_bundle_serial needs a serial (serials start at 1)")
	}
	if _, err := s.rootKey(); err != nil {
		return nil, err
	}
	cmd := &statev1.Command{Op: &statev1.Command_RecordBundleSerial{RecordBundleSerial: &statev1.RecordBundleSerialCommand{
		Region: req.GetRegion(), Serial: req.GetSerial()}}}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	dup, err := s.beginWrite(ctx, cmd)
	if err != nil {
		return nil, err
	}
	if dup == nil {
		if _, err := s.applyLocal(ctx, cmd); err != nil {
			return nil, err
		}
	}
	st := s.fsm.State()
	r, ok := st.Region(req.GetRegion())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "rootkms: no region %q", req.GetRegion())
	}
	return regionProto(r, st.Index()), nil
}
