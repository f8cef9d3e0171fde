// Checks qk_simd.h at 16 lanes (the AVX-512 shape) on any CPU: the vector wrapper is plain arrays,
// so the lane-count logic (group splits, Q6_K half scales, tails, the Q4_K / Q6_K rows against x
// permuted for 16 lanes) runs against the generic build.
// Partial decode attention (attend_part: heads in passes of up to 8, every KV type) is checked the same way. tests/test_kernels.py compiles and runs it;
// on an AVX-512 machine the real path is tested too.
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <vector>
#include "qk_types.h"
namespace qk { namespace emu {
struct F { float v[16]; }; struct I { int32_t v[16]; }; struct B8 { uint8_t v[32]; };
struct S {
  static constexpr int L = 16; using F = emu::F; using I = emu::I;
  // the Q6_K / Q4_K rows against permuted x (qk_simd.h mv_rows_q6k_perm, H = 2): the members below
  // do what qk_avx512.cpp's do, lane by lane
  static constexpr bool PERM_MV = true;
  static I ldq(const uint8_t*p){I r;for(int i=0;i<16;i++) memcpy(&r.v[i],p+4*i,4);return r;}
  static I lane_mask(I a,int m){for(auto&x:a.v)x&=m;return a;}
  template<int SH> static I lane_byte_at(I a){for(auto&x:a.v)x=(int32_t)((uint32_t)x&(255u<<SH));return a;}
  template<int SH> static I lane_byte(I a){for(auto&x:a.v)x=(int32_t)(((uint32_t)x>>SH)&255u);return a;}
  // Q6_K half n: q[0] = groups 4n, 4n + 1 and q[1] = 4n + 2, 4n + 3, each group's 32 unsigned quants in order
  static void q6k_half16(const uint8_t*sb,int n,I q[2]){
    uint8_t b[4][32]; const uint8_t*ql=sb+64*n,*qh=sb+128+32*n;
    for(int i=0;i<32;i++){ b[0][i]=(ql[i]&15)|(((qh[i]>>0)&3)<<4); b[1][i]=(ql[32+i]&15)|(((qh[i]>>2)&3)<<4);
                           b[2][i]=(ql[i]>>4)|(((qh[i]>>4)&3)<<4); b[3][i]=(ql[32+i]>>4)|(((qh[i]>>6)&3)<<4); }
    uint8_t c[2][64]; for(int j=0;j<2;j++){ memcpy(c[j],b[2*j],32); memcpy(c[j]+32,b[2*j+1],32); q[j]=ldq(c[j]); } }
  static void q6_scales(const uint8_t*sb,F a[1]){const float d=h2f(sb+208);for(int i=0;i<16;i++)a[0].v[i]=(float)(int8_t)sb[192+i]*d;}
  static F q6_gscale(const F a[1],int i){F r;for(int l=0;l<16;l++)r.v[l]=a[0].v[i+l/4];return r;}
  static F q4_gscale(const float*a,int g){F r;for(int l=0;l<16;l++)r.v[l]=a[l<8?g:g+2];return r;}
  static I u8(const uint8_t* p){I r; for(int i=0;i<16;i++) r.v[i]=p[i]; return r;}
  static I i8(const uint8_t* p){I r; for(int i=0;i<16;i++) r.v[i]=(int8_t)p[i]; return r;}
  static I and_(I a,int m){for(auto&x:a.v)x&=m;return a;}
  static I or_(I a,I b){for(int i=0;i<16;i++)a.v[i]|=b.v[i];return a;}
  static I sub(I a,int m){for(auto&x:a.v)x-=m;return a;}
  template<int N> static I srli(I a){for(auto&x:a.v)x=(uint32_t)x>>N;return a;}
  template<int N> static I slli(I a){for(auto&x:a.v)x=(uint32_t)x<<N;return a;}
  static I srl(I a,int n){for(auto&x:a.v)x=(uint32_t)x>>n;return a;}
  static I bit4(uint32_t qh,int e){I r;for(int i=0;i<16;i++) r.v[i]=((qh>>(e+i))&1)<<4;return r;}
  static F cvt(I a){F r;for(int i=0;i<16;i++)r.v[i]=(float)a.v[i];return r;}
  static F f32(const float*p){F r;for(int i=0;i<16;i++)r.v[i]=p[i];return r;}
  static F h16(const uint8_t*p){F r;for(int i=0;i<16;i++)r.v[i]=f16_to_f32(rd16(p+2*i));return r;}
  static F bf16(const uint8_t*p){F r;for(int i=0;i<16;i++)r.v[i]=bf16_to_f32(rd16(p+2*i));return r;}
  static float h2f(const uint8_t*p){return f16_to_f32(rd16(p));}
  static void h2f2(const uint8_t*p,float&a,float&b){a=h2f(p);b=h2f(p+2);}
  static F zero(){F r;for(auto&x:r.v)x=0;return r;}
  static F set1(float a){F r;for(auto&x:r.v)x=a;return r;}
  static F bcast(const float*p){return set1(*p);}
  static F add(F a,F b){for(int i=0;i<16;i++)a.v[i]+=b.v[i];return a;}
  static F mul(F a,F b){for(int i=0;i<16;i++)a.v[i]*=b.v[i];return a;}
  static F div(F a,F b){for(int i=0;i<16;i++)a.v[i]/=b.v[i];return a;}
  static F neg_abs(F a){for(auto&x:a.v)x=-fabsf(x);return a;}
  static F pick_neg(F s,F a,F b){for(int i=0;i<16;i++)if(signbit(s.v[i]))a.v[i]=b.v[i];return a;}
  static F fma(F a,F b,F c){for(int i=0;i<16;i++)c.v[i]+=a.v[i]*b.v[i];return c;}
  static F exp_neg(F a){for(int i=0;i<16;i++)a.v[i]=expf(a.v[i]);return a;}  // the lane logic, not the polynomial
  static void store(float*p,F a){for(int i=0;i<16;i++)p[i]=a.v[i];}
  static void prefetch(const uint8_t*){}
  static void prefetch_l2(const uint8_t*){}
  static float hsum(F a){float s=0;for(float x:a.v)s+=x;return s;}
  struct H { float v[8]; };
  static H h_zero(){H r;for(auto&x:r.v)x=0;return r;}
  static H h_ld(const float*p){H r;for(int i=0;i<8;i++)r.v[i]=p[i];return r;}
  static void h_st(float*p,H a){for(int i=0;i<8;i++)p[i]=a.v[i];}
  static H h_fma(H a,H b,H c){for(int i=0;i<8;i++)c.v[i]+=a.v[i]*b.v[i];return c;}
  static float h_sum(H a){float s=0;for(float x:a.v)s+=x;return s;}
  static H h_u8(const uint8_t*p,float m){H r;for(int i=0;i<8;i++)r.v[i]=m*(float)p[i];return r;}
  static H h_i8(const int8_t*p,float m){H r;for(int i=0;i<8;i++)r.v[i]=m*(float)p[i];return r;}
  static F h_f(H a){F r;for(int i=0;i<16;i++)r.v[i]=i<8?a.v[i]:0.f;return r;}
  static F f32_8(const float*p){F r;for(int i=0;i<16;i++)r.v[i]=i<8?p[i]:0.f;return r;}
  // bytes: 16-bit shifts over little-endian byte pairs, as the SIMD builds do
  using B = B8;
  static B ld32(const uint8_t*p){B r;for(int i=0;i<32;i++)r.v[i]=p[i];return r;}
  static B band(B a,int m){for(auto&x:a.v)x&=m;return a;}
  static B bor(B a,B b){for(int i=0;i<32;i++)a.v[i]|=b.v[i];return a;}
  static B bsub(B a,int m){for(auto&x:a.v)x=(uint8_t)(x-m);return a;}
  template<int N> static B sl16(B a){for(int i=0;i<32;i+=2){uint16_t w=(uint16_t)(a.v[i]|a.v[i+1]<<8);w=(uint16_t)(w<<N);a.v[i]=w&255;a.v[i+1]=w>>8;}return a;}
  template<int N> static B sr16(B a){for(int i=0;i<32;i+=2){uint16_t w=(uint16_t)(a.v[i]|a.v[i+1]<<8);w=(uint16_t)(w>>N);a.v[i]=w&255;a.v[i+1]=w>>8;}return a;}
  static void widen(B b,F out[2]){for(int i=0;i<32;i++)out[i/16].v[i%16]=(float)(int8_t)b.v[i];}
};
#include "qk_simd.h"
}
namespace generic {
RowsFn get(int type);
AttendPartFn get_attend(int kv_type);
void silu_mul(const float* gu, float* y, int64_t T, int64_t I);
}
}
using namespace qk;
int main(){
  int types[]={F32,F16,BF16,Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K,Q5_K,Q6_K};
  srand(1); double worst=0;
  for(int t: types){ BlockInfo bi=block_info(t); int N=45, K=(bi.elems==1)?200:512; int64_t rb=(int64_t)K/bi.elems*bi.bytes;
    std::vector<uint8_t> w(N*rb); for(auto&b:w) b=rand();
    if(bi.elems==1 && t==F32){ for(int i=0;i<N*K;i++){float f=(rand()/(float)RAND_MAX)-0.5f; memcpy(&w[4*i],&f,4);} }
    else { // finite halves everywhere: clear exponent high bits of every odd byte for float16 types, scale fields for blocks
      if(t==F16||t==BF16) for(size_t i=1;i<w.size();i+=2) w[i]&=0x3b;
      else for(int64_t b=0;b<(int64_t)w.size()/bi.bytes;b++){ uint8_t*p=&w[b*bi.bytes]; if(t==Q6_K) p[209]&=0x3b; else {p[1]&=0x3b; if(t==Q4_1||t==Q5_1||t==Q4_K||t==Q5_K) p[3]&=0x3b;} }
    }
    // T: decode, dot tiles, the k-major x path (one chunk, a partial chunk, several T blocks), panels
    for(int T: {1,2,3,7,8,16,70,131,200}){
      std::vector<float> x(T*K), xs(T*(K/32)), y1(T*N), y2(T*N), scr(34*K);
      for(auto&v:x) v=(rand()/(float)RAND_MAX)-0.5f;
      for(int a=0;a<T;a++) for(int g=0;g<K/32;g++){float s=0; for(int e=0;e<32;e++) s+=x[a*K+g*32+e]; xs[a*(K/32)+g]=s;}
      const int64_t cw=xt_width(T,16); std::vector<float> xt(xt_floats(T,K,cw)); make_xt(x.data(),T,K,cw,xt.data());
      Job j{t,w.data(),rb,K,x.data(),xs.data(),T,y1.data(),N,scr.data(),false};
      if(T>=XT_MIN_T && T<PANEL_MIN_T){ j.xt=xt.data(); j.cw=cw; }
      std::vector<float> xp(T*K), xs16(T*(K/16));  // x permuted for the Q6_K / Q4_K rows, as Plan_run does at 16 lanes
      if(T<=MV_PASS_MAX_T && t==Q6_K){ perm_x<false>(x.data(),T,K,xp.data(),Q6kShift{},2); sums16_x(x.data(),T,K,xs16.data()); j.xp=xp.data(); j.xs16=xs16.data(); }
      if(T<=MV_PASS_MAX_T && t==Q4_K){ perm_x<true>(x.data(),T,K,xp.data(),Q4kShift{},2); j.xp4=xp.data(); }
      emu::rows_fn(t)(j,0,N); j.y=y2.data(); generic::get(t)(j,0,N);
      double num=0,den=0; for(int i=0;i<T*N;i++){num+=(y1[i]-y2[i])*(double)(y1[i]-y2[i]); den+=y2[i]*(double)y2[i];}
      double e=sqrt(num/den); if(e>worst) worst=e; if(e>1e-5) printf("FAIL type %d T %d err %g\n",t,T,e);
    }
  }
  // decode attention at 16 lanes (hd 64 and 128, grouped heads, paged in blocks of 16 with a window
  // start and a partial last block) vs the portable version
  // query heads per kv head: 3, 5 (one pass of 16 lanes, two of 8), 16 (two passes of 8), 1
  int heads[4][2]={{6,2},{10,2},{16,1},{4,4}};
  for(int kt: {(int)KV_F32,(int)KV_F16,(int)KV_BF16,(int)KV_Q8_0})
  for(auto& hk: heads) for(int hd: {64,128}) for(int p0: {0,5}){ const int nh=hk[0], nkv=hk[1], bs=16, nblk=3, L=37;
    const int rb = (int)kv_row_bytes(kt,hd), g = nh/nkv;
    std::vector<float> q(nh*hd), o1(g*hd), o2(g*hd), sc(g*L), ml1(2*g), ml2(2*g), row(hd);
    std::vector<uint8_t> K(nblk*nkv*bs*rb), V(nblk*nkv*bs*rb);
    for(auto&f:q) f=(rand()/(float)RAND_MAX)-0.5f;
    for(size_t r=0;r<V.size()/rb;r++){ uint8_t* dst=V.data()+r*rb;  // V: a row per position
      for(auto&f:row) f=(rand()/(float)RAND_MAX)-0.5f;
      for(int i=0;i<hd;i++){ const float f=row[i];
        if(kt==KV_F32) memcpy(dst+4*i,&f,4); else if(kt!=KV_Q8_0){ uint16_t h = kt==KV_F16 ? f32_to_f16(f) : f32_to_bf16(f); memcpy(dst+2*i,&h,2); } }
      if(kt==KV_Q8_0) quantize_q8_0_row(row.data(),dst,hd); }
    for(size_t r=0;r<K.size()/rb;r++){  // K: transposed in each block (qk_types.h kv_k_at)
      for(auto&f:row) f=(rand()/(float)RAND_MAX)-0.5f;
      write_k_row(K.data()+(r/bs)*bs*rb,bs,r%bs,row.data(),hd,kt); }
    int order[nblk]={2,0,1};  // blocks out of order
    for(int kvh=0;kvh<nkv;kvh++){
      const void* kb[nblk]; const void* vb[nblk];
      for(int j=0;j<nblk;j++){ kb[j]=K.data()+(order[j]*nkv+kvh)*bs*rb; vb[j]=V.data()+(order[j]*nkv+kvh)*bs*rb; }
      AttendPartFn emu_fn = kt==KV_F32 ? emu::attend_part<KV_F32> : kt==KV_F16 ? emu::attend_part<KV_F16> : kt==KV_BF16 ? emu::attend_part<KV_BF16> : emu::attend_part<KV_Q8_0>;
      emu_fn(q.data()+kvh*g*hd,o1.data(),ml1.data(),kb,vb,bs,p0,L,g,hd,0.125f,sc.data());
      generic::get_attend(kt)(q.data()+kvh*g*hd,o2.data(),ml2.data(),kb,vb,bs,p0,L,g,hd,0.125f,sc.data());
      double num=0,den=0; for(int i=0;i<g*hd;i++){num+=(o1[i]-o2[i])*(double)(o1[i]-o2[i]); den+=o2[i]*(double)o2[i];}
      for(int i=0;i<2*g;i++){num+=(ml1[i]-ml2[i])*(double)(ml1[i]-ml2[i]); den+=ml2[i]*(double)ml2[i];}
      double e=sqrt(num/den); if(e>worst) worst=e; if(e>1e-5) printf("FAIL attention kv %d nh %d hd %d err %g\n",kt,nh,hd,e);
    }
  }
  { const int T=3, I=37; std::vector<float> gu(T*2*I), y1(T*I), y2(T*I);
    for(auto&f:gu) f=200.f*(rand()/(float)RAND_MAX)-100.f;
    emu::silu_mul_v(gu.data(),y1.data(),T,I); generic::silu_mul(gu.data(),y2.data(),T,I);
    double num=0,den=0; for(int i=0;i<T*I;i++){num+=(y1[i]-y2[i])*(double)(y1[i]-y2[i]); den+=y2[i]*(double)y2[i];}
    double e=sqrt(num/den); if(e>worst) worst=e; if(e>1e-5) printf("FAIL silu err %g\n",e); }
  printf("worst %g\n",worst);
}
