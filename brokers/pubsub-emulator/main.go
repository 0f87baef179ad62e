// Command pubsub-emulator serves Google's in-memory Pub/Sub fake (pstest) on a
// fixed address, speaking gRPC and the REST/JSON admin API on the same port,
// like Google's own emulator.
//
// It is built by brokers/pubsub.sh with Debian's Go toolchain in GOPATH
// mode against Debian's golang-google-cloud-dev; see brokers/README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"cloud.google.com/go/pubsub/pstest"
	pb "google.golang.org/genproto/googleapis/pubsub/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8086", "host:port to listen on (gRPC and REST)")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	// pstest.NewServer also starts a gRPC server on a random localhost port;
	// we only want its GServer, so close that server straight away (no
	// subscription exists yet, so Close stops nothing else).
	fake := pstest.NewServer()
	if err := fake.Close(); err != nil {
		log.Fatalf("closing pstest's own listener: %v", err)
	}
	gs := &fake.GServer
	// pstest leaves the methods it does not implement (snapshots, push
	// config) as a nil embedded interface: a call would panic. Answer
	// UNIMPLEMENTED instead.
	gs.PublisherServer = &pb.UnimplementedPublisherServer{}
	gs.SubscriberServer = &pb.UnimplementedSubscriberServer{}

	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("listen %s: %v", *addr, err)
	}
	grpcLis, httpLis := splitListener(lis)

	gsrv := grpc.NewServer(
		grpc.UnaryInterceptor(unaryGuard),
		grpc.StreamInterceptor(streamGuard),
		grpc.MaxRecvMsgSize(20<<20),
	)
	pb.RegisterPublisherServer(gsrv, gs)
	pb.RegisterSubscriberServer(gsrv, gs)

	hsrv := &http.Server{Handler: newREST(gs), ReadHeaderTimeout: 30 * time.Second}

	errc := make(chan error, 2)
	go func() { errc <- gsrv.Serve(grpcLis) }()
	go func() { errc <- hsrv.Serve(httpLis) }()
	fmt.Printf("pubsub-emulator: serving gRPC and REST on %s\n", lis.Addr())
	log.Printf("listening on %s", lis.Addr())

	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
	select {
	case s := <-sigc:
		log.Printf("%v: shutting down", s)
	case err := <-errc:
		log.Printf("server stopped: %v", err)
	}
	_ = lis.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_ = hsrv.Shutdown(ctx)
	stopped := make(chan struct{})
	go func() { gsrv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-ctx.Done():
		gsrv.Stop()
	}
}

// recovered turns a panic inside pstest into an INTERNAL error instead of
// killing the emulator.
func recovered(method string, err *error) {
	if r := recover(); r != nil {
		log.Printf("panic in %s: %v", method, r)
		*err = status.Errorf(codes.Internal, "pubsub-emulator: %s panicked: %v", method, r)
	}
}

func unaryGuard(ctx context.Context, req interface{}, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp interface{}, err error) {
	// pstest's ModifyAckDeadline dereferences the message of every ack id
	// without checking it exists (it panics on an unknown or expired ack id,
	// e.g. one from before an emulator restart). Real Pub/Sub ignores unknown
	// ids, so do the same: on a panic, retry id by id and skip the bad ones.
	if m, ok := req.(*pb.ModifyAckDeadlineRequest); ok {
		return modifyAckDeadline(ctx, m, info, handler)
	}
	defer recovered(info.FullMethod, &err)
	return handler(ctx, req)
}

func modifyAckDeadline(ctx context.Context, m *pb.ModifyAckDeadlineRequest, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (interface{}, error) {
	call := func(req *pb.ModifyAckDeadlineRequest) (resp interface{}, err error, panicked bool) {
		defer func() {
			if r := recover(); r != nil {
				panicked = true
			}
		}()
		resp, err = handler(ctx, req)
		return resp, err, false
	}
	resp, err, panicked := call(m)
	if !panicked {
		return resp, err
	}
	for _, id := range m.AckIds {
		one := &pb.ModifyAckDeadlineRequest{
			Subscription:       m.Subscription,
			AckIds:             []string{id},
			AckDeadlineSeconds: m.AckDeadlineSeconds,
		}
		r, err, panicked := call(one)
		if panicked {
			continue
		}
		if err != nil {
			return nil, err
		}
		resp = r
	}
	if resp == nil {
		resp, err = handler(ctx, &pb.ModifyAckDeadlineRequest{Subscription: m.Subscription, AckDeadlineSeconds: m.AckDeadlineSeconds})
	}
	return resp, err
}

func streamGuard(srv interface{}, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	defer recovered(info.FullMethod, &err)
	return handler(srv, ss)
}
